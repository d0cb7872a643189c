//! The CEL rules (`x-kubernetes-validations`) of Istio's CRDs, implemented in Rust.
//!
//! A JSON Schema validator ignores these rules; the API server evaluates them. Rather than
//! embed a CEL interpreter, each rule text that occurs in the schemas of the kinds fedmesh
//! renders is recognised here (after collapsing whitespace) and checked by a Rust function with
//! the same meaning. A rule whose text is not recognised is reported by
//! [`crate::schema::Schemas::unimplemented_rules`], so a new Istio release cannot add a rule
//! that fedmesh silently skips.

use serde_json::Value;

/// A recognised rule, evaluated with `self` bound to the value at the rule's schema node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Check {
    /// `(has(self.a) ? 1 : 0) + (has(self.b) ? 1 : 0) ... <= 1`.
    AtMostOne(Vec<String>),
    /// `!self.contains("*")`.
    NoWildcard,
    /// `self != "*"`.
    NotWildcard,
    /// `self.all(key, !key.contains("*"))`.
    KeysWithoutWildcard,
    /// `self.all(key, key.size() != 0)`.
    KeysNotEmpty,
    /// `self.all(key, size(key) < 63 && key.matches("^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$"))`.
    KeysArePortNames,
    /// `self.all(key, 0 < int(key) && int(key) <= 65535)`.
    KeysArePorts,
    /// `0 < self && self <= 65535`.
    Port,
    /// `self.size() == 0`.
    Empty,
    /// `duration(self) >= duration('1ms')`.
    AtLeastOneMillisecond,
    /// `self.all(l1, self.exists_one(l2, l1.number == l2.number))`.
    UniqueNumbers,
    /// ServiceEntry: CIDR addresses only with resolution NONE or STATIC.
    CidrOnlyForNoneOrStatic,
    /// ServiceEntry: resolution NONE (the default) cannot set endpoints.
    NoneWithoutEndpoints,
    /// ServiceEntry: DNS_ROUND_ROBIN has at most one endpoint.
    RoundRobinOneEndpoint,
    /// `has(self.address) || has(self.network)`.
    AddressOrNetwork,
    /// A `unix://` endpoint address carries no ports.
    UdsWithoutPorts,
    /// A `unix://` address is absolute (`/`) or abstract (`@`).
    UdsAbsolute,
    /// A `unix://` address is not a directory.
    UdsNotDirectory,
    /// serviceAccounts cannot be combined with principals or namespaces.
    ServiceAccountsAlone,
    /// PeerAuthentication: portLevelMtls needs a non-empty selector.
    PortLevelNeedsSelector,
}

impl Check {
    /// Recognises a rule by its text; `None` when it has no Rust counterpart.
    pub(crate) fn parse(rule: &str) -> Option<Self> {
        let rule = rule.split_whitespace().collect::<Vec<_>>().join(" ");
        let check = match rule.as_str() {
            r#"!self.contains("*")"# => Self::NoWildcard,
            r#"self != "*""# => Self::NotWildcard,
            r#"self.all(key, !key.contains("*"))"# => Self::KeysWithoutWildcard,
            "self.all(key, key.size() != 0)" => Self::KeysNotEmpty,
            r#"self.all(key, size(key) < 63 && key.matches("^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$"))"# => {
                Self::KeysArePortNames
            }
            "self.all(key, 0 < int(key) && int(key) <= 65535)" => Self::KeysArePorts,
            "0 < self && self <= 65535" => Self::Port,
            "self.size() == 0" => Self::Empty,
            "duration(self) >= duration('1ms')" => Self::AtLeastOneMillisecond,
            "self.all(l1, self.exists_one(l2, l1.number == l2.number))" => Self::UniqueNumbers,
            r#"!((has(self.addresses) ? self.addresses : []).exists(k, k.contains("/")) && !((has(self.resolution) ? self.resolution : "NONE") in ["STATIC", "NONE"]))"# => {
                Self::CidrOnlyForNoneOrStatic
            }
            r#"((has(self.resolution) ? self.resolution : "NONE") == "NONE") ? !has(self.endpoints) : true"# => {
                Self::NoneWithoutEndpoints
            }
            r#"((has(self.resolution) ? self.resolution : "") == "DNS_ROUND_ROBIN") ? ((has(self.endpoints) ? self.endpoints : []).size() <= 1) : true"# => {
                Self::RoundRobinOneEndpoint
            }
            "has(self.address) || has(self.network)" => Self::AddressOrNetwork,
            r#"(has(self.address) ? self.address : "").startsWith("unix://") ? !has(self.ports) : true"# => {
                Self::UdsWithoutPorts
            }
            r#"self.startsWith("unix://") ? (self.substring(7, 8) == "/" || self.substring(7, 8) == "@") : true"# => {
                Self::UdsAbsolute
            }
            r#"self.startsWith("unix://") ? !self.endsWith("/") : true"# => Self::UdsNotDirectory,
            "(has(self.serviceAccounts) || has(self.notServiceAccounts)) ? (!has(self.principals) && !has(self.notPrincipals) && !has(self.namespaces) && !has(self.notNamespaces)) : true" => {
                Self::ServiceAccountsAlone
            }
            "has(self.portLevelMtls) ? (((has(self.selector) && has(self.selector.matchLabels)) ? self.selector.matchLabels : {}).size() > 0) : true" => {
                Self::PortLevelNeedsSelector
            }
            other => return at_most_one(other).map(Self::AtMostOne),
        };
        Some(check)
    }

    /// Whether the rule holds for `this` (CEL's `self`). A value of the wrong type fails.
    pub(crate) fn holds(&self, this: &Value) -> bool {
        let has = |field: &str| this.get(field).is_some();
        let str_of = |field: &str, default: &'static str| {
            this.get(field).and_then(Value::as_str).unwrap_or(default)
        };
        let keys = || this.as_object().map(|m| m.keys());
        match self {
            Self::AtMostOne(fields) => fields.iter().filter(|f| has(f)).count() <= 1,
            Self::NoWildcard => this.as_str().is_some_and(|s| !s.contains('*')),
            Self::NotWildcard => this.as_str().is_some_and(|s| s != "*"),
            Self::KeysWithoutWildcard => keys().is_some_and(|mut k| k.all(|k| !k.contains('*'))),
            Self::KeysNotEmpty => keys().is_some_and(|mut k| k.all(|k| !k.is_empty())),
            Self::KeysArePortNames => keys().is_some_and(|mut k| k.all(|k| is_port_name(k))),
            Self::KeysArePorts => keys().is_some_and(|mut k| {
                k.all(|k| k.parse::<i64>().is_ok_and(|p| (1..=65535).contains(&p)))
            }),
            Self::Port => this.as_i64().is_some_and(|p| (1..=65535).contains(&p)),
            Self::Empty => match this {
                Value::String(s) => s.is_empty(),
                Value::Array(a) => a.is_empty(),
                Value::Object(o) => o.is_empty(),
                _ => false,
            },
            Self::AtLeastOneMillisecond => this
                .as_str()
                .and_then(duration_nanos)
                .is_some_and(|ns| ns >= 1e6),
            Self::UniqueNumbers => this.as_array().is_some_and(|items| {
                items.iter().all(|a| {
                    items
                        .iter()
                        .filter(|b| a.get("number") == b.get("number"))
                        .count()
                        == 1
                })
            }),
            Self::CidrOnlyForNoneOrStatic => {
                let cidr = this
                    .get("addresses")
                    .and_then(Value::as_array)
                    .is_some_and(|a| {
                        a.iter()
                            .any(|k| k.as_str().is_some_and(|k| k.contains('/')))
                    });
                !cidr || ["STATIC", "NONE"].contains(&str_of("resolution", "NONE"))
            }
            Self::NoneWithoutEndpoints => {
                str_of("resolution", "NONE") != "NONE" || !has("endpoints")
            }
            Self::RoundRobinOneEndpoint => {
                str_of("resolution", "") != "DNS_ROUND_ROBIN"
                    || this
                        .get("endpoints")
                        .and_then(Value::as_array)
                        .is_none_or(|e| e.len() <= 1)
            }
            Self::AddressOrNetwork => has("address") || has("network"),
            Self::UdsWithoutPorts => !str_of("address", "").starts_with("unix://") || !has("ports"),
            Self::UdsAbsolute => this
                .as_str()
                .is_some_and(|s| match s.strip_prefix("unix://") {
                    Some(path) => path.starts_with('/') || path.starts_with('@'),
                    None => true,
                }),
            Self::UdsNotDirectory => this
                .as_str()
                .is_some_and(|s| !s.starts_with("unix://") || !s.ends_with('/')),
            Self::ServiceAccountsAlone => {
                !(has("serviceAccounts") || has("notServiceAccounts"))
                    || ["principals", "notPrincipals", "namespaces", "notNamespaces"]
                        .iter()
                        .all(|f| !has(f))
            }
            Self::PortLevelNeedsSelector => {
                !has("portLevelMtls")
                    || this
                        .pointer("/selector/matchLabels")
                        .and_then(Value::as_object)
                        .is_some_and(|m| !m.is_empty())
            }
        }
    }
}

/// The field names of `(has(self.a) ? 1 : 0) + (has(self.b) ? 1 : 0) ... <= 1`.
fn at_most_one(rule: &str) -> Option<Vec<String>> {
    let terms = rule.strip_suffix(" <= 1")?;
    terms
        .split(" + ")
        .map(|term| {
            let field = term
                .strip_prefix("(has(self.")?
                .strip_suffix(") ? 1 : 0)")?;
            field
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
                .then(|| field.to_owned())
        })
        .collect::<Option<Vec<_>>>()
        .filter(|fields| fields.len() >= 2)
}

/// `size(key) < 63 && key.matches("^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$")`.
fn is_port_name(key: &str) -> bool {
    let b = key.as_bytes();
    !b.is_empty()
        && b.len() < 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// A Go/CEL duration (`1h30m`, `0.5s`, `300ms`, `-1s`) in nanoseconds; `None` when malformed.
fn duration_nanos(s: &str) -> Option<f64> {
    let (sign, mut rest) = match s.strip_prefix('-') {
        Some(r) => (-1.0, r),
        None => (1.0, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Some(0.0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let value: f64 = number.parse().ok()?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let scale = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += value * scale;
        rest = after;
    }
    Some(sign * total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(rule: &str) -> Check {
        Check::parse(rule).unwrap_or_else(|| panic!("not recognised: {rule}"))
    }

    #[test]
    fn at_most_one_is_recognised_generically() {
        let c = check(
            "(has(self.selector) ? 1 : 0) + (has(self.targetRef) ? 1 : 0) +\n  (has(self.targetRefs) ? 1 : 0) <= 1",
        );
        assert_eq!(
            c,
            Check::AtMostOne(vec![
                "selector".into(),
                "targetRef".into(),
                "targetRefs".into()
            ])
        );
        assert!(c.holds(&json!({"selector": {}})));
        assert!(!c.holds(&json!({"selector": {}, "targetRefs": []})));
        assert_eq!(Check::parse("(has(self.a) ? 1 : 0) <= 1"), None);
        assert_eq!(Check::parse("has(self.wasm) != has(self.lua)"), None);
    }

    #[test]
    fn durations_follow_go() {
        assert_eq!(duration_nanos("1ms"), Some(1e6));
        assert_eq!(duration_nanos("1h30m"), Some(5400e9));
        assert_eq!(duration_nanos("1.5s"), Some(1.5e9));
        assert_eq!(duration_nanos("0"), Some(0.0));
        assert_eq!(duration_nanos("10"), None);
        assert_eq!(duration_nanos("1d"), None);
        let c = check("duration(self) >= duration('1ms')");
        assert!(c.holds(&json!("2s")));
        assert!(!c.holds(&json!("500us")));
        assert!(!c.holds(&json!("soon")));
    }

    #[test]
    fn service_entry_rules() {
        let none = check(
            r#"((has(self.resolution) ? self.resolution : "NONE") == "NONE") ? !has(self.endpoints) : true"#,
        );
        assert!(!none.holds(&json!({"endpoints": [{"address": "a"}]})));
        assert!(none.holds(&json!({"resolution": "DNS", "endpoints": [{"address": "a"}]})));
        let cidr = check(
            r#"!((has(self.addresses) ? self.addresses : []).exists(k, k.contains("/")) && !((has(self.resolution) ? self.resolution : "NONE") in ["STATIC", "NONE"]))"#,
        );
        assert!(cidr.holds(&json!({"addresses": ["10.0.0.0/8"]})));
        assert!(!cidr.holds(&json!({"addresses": ["10.0.0.0/8"], "resolution": "DNS"})));
        assert!(cidr.holds(&json!({"addresses": ["10.0.0.1"], "resolution": "DNS"})));
        let unique = check("self.all(l1, self.exists_one(l2, l1.number == l2.number))");
        assert!(unique.holds(&json!([{"number": 1}, {"number": 2}])));
        assert!(!unique.holds(&json!([{"number": 1}, {"number": 1}])));
        let names = check(
            r#"self.all(key, size(key) < 63 && key.matches("^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$"))"#,
        );
        assert!(names.holds(&json!({"tcp-mpc": 1})));
        assert!(!names.holds(&json!({"tcp_mpc": 1})));
        assert!(!names.holds(&json!({"-tcp": 1})));
    }

    #[test]
    fn security_rules() {
        let sa = check(
            "(has(self.serviceAccounts) || has(self.notServiceAccounts)) ? (!has(self.principals) &&\n!has(self.notPrincipals) && !has(self.namespaces) && !has(self.notNamespaces)) : true",
        );
        assert!(sa.holds(&json!({"serviceAccounts": ["a"]})));
        assert!(!sa.holds(&json!({"serviceAccounts": ["a"], "principals": ["p"]})));
        let pl = check(
            "has(self.portLevelMtls) ? (((has(self.selector) && has(self.selector.matchLabels)) ? self.selector.matchLabels : {}).size() > 0) : true",
        );
        assert!(!pl.holds(&json!({"portLevelMtls": {"80": {"mode": "DISABLE"}}})));
        assert!(pl.holds(&json!({"portLevelMtls": {}, "selector": {"matchLabels": {"a": "b"}}})));
        let ports = check("self.all(key, 0 < int(key) && int(key) <= 65535)");
        assert!(ports.holds(&json!({"8080": {}})));
        assert!(!ports.holds(&json!({"0": {}})));
        assert!(!ports.holds(&json!({"http": {}})));
    }
}

//! The CEL rules (`x-kubernetes-validations`) of a CRD schema, compiled and evaluated by a CEL
//! interpreter (the `cel` crate) the way the API server evaluates them: `self` bound to the
//! value at the rule's schema node, the rule holding when it evaluates to `true`.
//!
//! The environment is CEL's standard library (with `has`, `all`, `exists`, `exists_one`,
//! `matches`, `duration`, `int`, `size`, `startsWith`, ...) plus the strings extension
//! (`substring`, ...) that Kubernetes also loads. Not supported: Kubernetes' own CEL libraries
//! (`url()`, `ip()`, `cidr()`, `quantity()`, `format`, authorizer checks, the lists library's
//! `isSorted`/`sum`), transition rules (`oldSelf`, evaluated on update only), and the API
//! server's cost budget. A rule that does not compile or uses `oldSelf` is listed by
//! [`crate::Schemas::unsupported_rules`]; one that calls a function this environment lacks
//! fails when it runs, as a violation that names the missing function.

use std::sync::{Arc, OnceLock};

use cel::{Context, Env, ExecutionError, Program, Value as Cel};
use serde_json::Value;

/// Standard library and strings extension, built once.
fn env() -> &'static Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Env::stdlib();
        // Declaring the strings extension into a fresh standard library cannot conflict.
        let _ = env.add_extension(cel::extensions::strings);
        Arc::new(env)
    })
}

/// A compiled rule.
pub(crate) struct Rule {
    program: Program,
}

impl Rule {
    /// Compiles `text`; `Err` says why it cannot be evaluated here.
    pub(crate) fn compile(text: &str) -> Result<Self, String> {
        let program = env().compile(text).map_err(|e| e.to_string())?;
        if program.references().has_variable("oldSelf") {
            return Err(
                "a transition rule (oldSelf): the API server runs it on update only".into(),
            );
        }
        Ok(Self { program })
    }

    /// Whether the rule holds for `this` (CEL's `self`); `Err` when it cannot be evaluated
    /// (a type the rule does not expect, an index out of range, a missing function): the API
    /// server refuses the object then too.
    pub(crate) fn holds(&self, this: &Value) -> Result<bool, Unevaluated> {
        let value = cel::to_value(this.clone()).map_err(|e| Unevaluated::Failed(e.to_string()))?;
        let mut context = Context::with_env(env().clone());
        context.add_variable_from_value("self", value);
        match self.program.execute(&context) {
            Ok(Cel::Bool(holds)) => Ok(holds),
            Ok(other) => Err(Unevaluated::Failed(format!(
                "evaluates to {other:?}, not a bool"
            ))),
            Err(ExecutionError::UndeclaredReference(name)) => Err(Unevaluated::Unsupported(
                format!("uses {name}, which this CEL environment does not provide"),
            )),
            Err(error) => Err(Unevaluated::Failed(error.to_string())),
        }
    }
}

/// Why a rule gave no answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Unevaluated {
    /// It failed on this value (a type it does not expect, an index out of range): the rule
    /// is broken as the API server would find it.
    Failed(String),
    /// It needs something this environment lacks: a gap here, not in the object.
    Unsupported(String),
}

impl std::fmt::Display for Unevaluated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Failed(why) | Self::Unsupported(why) => f.write_str(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn holds(rule: &str, this: Value) -> Result<bool, String> {
        Rule::compile(rule)
            .unwrap()
            .holds(&this)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn rules_are_evaluated_not_matched() {
        // The same rule written two ways means the same.
        let spaced = "( has(self.a) ? 1 : 0 )+(has(self.b)?1:0) <= 1";
        assert_eq!(holds(spaced, json!({"a": 1})), Ok(true));
        assert_eq!(holds(spaced, json!({"a": 1, "b": 2})), Ok(false));
        assert_eq!(holds("0 < self && self <= 65535", json!(443)), Ok(true));
        assert_eq!(holds("0 < self && self <= 65535", json!(65536)), Ok(false));
        assert_eq!(
            holds("duration(self) >= duration('1ms')", json!("0.5ms")),
            Ok(false)
        );
        assert_eq!(
            holds("duration(self) >= duration('1ms')", json!("1h30m")),
            Ok(true)
        );
        let uds = r#"self.startsWith("unix://") ? (self.substring(7, 8) == "/" || self.substring(7, 8) == "@") : true"#;
        assert_eq!(holds(uds, json!("unix:///run/x.sock")), Ok(true));
        assert_eq!(holds(uds, json!("unix://run/x.sock")), Ok(false));
        assert!(
            holds(uds, json!("unix://"))
                .unwrap_err()
                .contains("out of range")
        );
        let unique = "self.all(l1, self.exists_one(l2, l1.number == l2.number))";
        assert_eq!(
            holds(unique, json!([{"number": 1}, {"number": 2}])),
            Ok(true)
        );
        assert_eq!(
            holds(unique, json!([{"number": 1}, {"number": 1}])),
            Ok(false)
        );
        let ports = "self.all(key, 0 < int(key) && int(key) <= 65535)";
        assert_eq!(holds(ports, json!({"80": "a", "443": "b"})), Ok(true));
        assert_eq!(holds(ports, json!({"65536": "a"})), Ok(false));
    }

    #[test]
    fn what_cannot_be_evaluated_says_why() {
        assert!(Rule::compile("self.a ==").is_err());
        assert!(
            Rule::compile("self == oldSelf")
                .err()
                .unwrap()
                .contains("oldSelf")
        );
        let missing = Rule::compile("url(self).getHost() == 'x'")
            .unwrap()
            .holds(&json!("https://x"))
            .unwrap_err();
        assert!(
            matches!(&missing, Unevaluated::Unsupported(why) if why.contains("url")),
            "{missing:?}"
        );
        assert!(
            holds("self.size()", json!("x"))
                .unwrap_err()
                .contains("not a bool")
        );
        assert!(
            holds("self > 1", json!("x")).is_err(),
            "a type the rule does not expect"
        );
    }

    /// Holds (`true`), fails (`false`), or cannot be evaluated on this value (`false` too: the
    /// API server refuses the object).
    fn ok(rule: &str, this: Value) -> bool {
        holds(rule, this).unwrap_or(false)
    }

    #[test]
    fn istio_rules_as_before() {
        // The cases the rule-by-rule Rust counterparts were tested with, now evaluated.
        let one = "(has(self.selector) ? 1 : 0) + (has(self.targetRef) ? 1 : 0) +\n  (has(self.targetRefs) ? 1 : 0) <= 1";
        assert!(ok(one, json!({"selector": {}})));
        assert!(!ok(one, json!({"selector": {}, "targetRefs": []})));
        let duration = "duration(self) >= duration('1ms')";
        assert!(ok(duration, json!("2s")));
        assert!(!ok(duration, json!("500us")));
        assert!(!ok(duration, json!("soon")));
        assert!(!ok(duration, json!("10")), "Go durations need a unit");

        let none = r#"((has(self.resolution) ? self.resolution : "NONE") == "NONE") ? !has(self.endpoints) : true"#;
        assert!(!ok(none, json!({"endpoints": [{"address": "a"}]})));
        assert!(ok(
            none,
            json!({"resolution": "DNS", "endpoints": [{"address": "a"}]})
        ));
        let cidr = r#"!((has(self.addresses) ? self.addresses : []).exists(k, k.contains("/")) && !((has(self.resolution) ? self.resolution : "NONE") in ["STATIC", "NONE"]))"#;
        assert!(ok(cidr, json!({"addresses": ["10.0.0.0/8"]})));
        assert!(!ok(
            cidr,
            json!({"addresses": ["10.0.0.0/8"], "resolution": "DNS"})
        ));
        assert!(ok(
            cidr,
            json!({"addresses": ["10.0.0.1"], "resolution": "DNS"})
        ));
        let names = r#"self.all(key, size(key) < 63 && key.matches("^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$"))"#;
        assert!(ok(names, json!({"tcp-mpc": 1})));
        assert!(!ok(names, json!({"tcp_mpc": 1})));
        assert!(!ok(names, json!({"-tcp": 1})));

        let sa = "(has(self.serviceAccounts) || has(self.notServiceAccounts)) ? (!has(self.principals) &&\n!has(self.notPrincipals) && !has(self.namespaces) && !has(self.notNamespaces)) : true";
        assert!(ok(sa, json!({"serviceAccounts": ["a"]})));
        assert!(!ok(
            sa,
            json!({"serviceAccounts": ["a"], "principals": ["p"]})
        ));
        let pl = "has(self.portLevelMtls) ? (((has(self.selector) && has(self.selector.matchLabels)) ? self.selector.matchLabels : {}).size() > 0) : true";
        assert!(!ok(
            pl,
            json!({"portLevelMtls": {"80": {"mode": "DISABLE"}}})
        ));
        assert!(ok(
            pl,
            json!({"portLevelMtls": {}, "selector": {"matchLabels": {"a": "b"}}})
        ));
        let ports = "self.all(key, 0 < int(key) && int(key) <= 65535)";
        assert!(ok(ports, json!({"8080": {}})));
        assert!(!ok(ports, json!({"0": {}})));
        assert!(!ok(ports, json!({"http": {}})));
    }
}

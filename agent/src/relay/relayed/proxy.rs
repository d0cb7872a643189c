//! Which HTTP CONNECT proxy the TLS/TCP carrier goes through (pure): `--proxy`, else
//! `HTTPS_PROXY` / `https_proxy`; never for hosts `NO_PROXY` / `no_proxy` lists (names and their
//! subdomains, addresses, CIDR ranges, `*`).
//!
//! Proxy URLs are `http://[user:password@]host[:port]` (port 80 when absent; a bare
//! `host:port` is taken as `http://`). `NO_PROXY` is a comma-separated list of host names
//! (matching the name and its subdomains; a leading `.` or `*.` is ignored), IP addresses, or
//! `*` (no proxy at all); a `:port` suffix on an entry is ignored.

use base64::Engine as _;

/// What is wrong with a proxy setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("proxy {source_name} {value:?}: {reason}")]
pub struct ProxyError {
    /// Where it came from (`--proxy`, `HTTPS_PROXY`, ...).
    pub source_name: String,
    /// The value, credentials hidden.
    pub value: String,
    /// What is wrong.
    pub reason: String,
}

/// An HTTP proxy that tunnels with CONNECT.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    /// Its host (name or IP address, no brackets).
    pub host: String,
    /// Its port.
    pub port: u16,
    /// `user:password`, base64, for `Proxy-Authorization: Basic`.
    pub basic: Option<String>,
}

impl std::fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

/// `http://host:port`, never the credentials.
impl std::fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.host.contains(':') {
            true => write!(f, "http://[{}]:{}", self.host, self.port),
            false => write!(f, "http://{}:{}", self.host, self.port),
        }
    }
}

fn hide_credentials(value: &str) -> String {
    match (value.find("://"), value.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &value[..s + 3], &value[at..]),
        (None, Some(at)) => format!("***{}", &value[at..]),
        _ => value.to_owned(),
    }
}

impl ProxyUrl {
    /// Parses a proxy URL; `source_name` names the setting in errors.
    pub fn parse(value: &str, source_name: &str) -> Result<Self, ProxyError> {
        let fail = |reason: &str| ProxyError {
            source_name: source_name.to_owned(),
            value: hide_credentials(value),
            reason: reason.to_owned(),
        };
        let value = value.trim();
        let rest = match value.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
                return Err(fail(
                    "TLS to the proxy (https://) is not supported; give its http:// address",
                ));
            }
            Some(_) => return Err(fail("only http:// proxies (HTTP CONNECT) are supported")),
            None => value,
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.contains('?') {
            return Err(fail("a proxy URL has no path"));
        }
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| fail("unclosed `[`"))?;
            match after {
                "" => (host, None),
                p => (
                    host,
                    Some(p.strip_prefix(':').ok_or_else(|| fail("bad port"))?),
                ),
            }
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty()
            || host.len() > 253
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'))
        {
            return Err(fail("no valid host"));
        }
        let port = match port {
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| fail("bad port"))?,
        };
        let basic = userinfo.map(|u| base64::engine::general_purpose::STANDARD.encode(u));
        Ok(Self {
            host: host.to_ascii_lowercase(),
            port,
            basic,
        })
    }
}

/// The proxy to use and the hosts to reach without it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxySettings {
    proxy: Option<ProxyUrl>,
    no_proxy: Vec<String>,
}

impl ProxySettings {
    /// No proxy.
    pub fn none() -> Self {
        Self::default()
    }

    /// From `--proxy` (`flag`) and the environment (`env` looks a variable up): the flag wins
    /// over `HTTPS_PROXY`, which wins over `https_proxy`; `NO_PROXY` over `no_proxy`. Empty
    /// values count as unset.
    pub fn from_sources(
        flag: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ProxyError> {
        let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let proxy = match flag.filter(|f| !f.trim().is_empty()) {
            Some(flag) => Some(ProxyUrl::parse(flag, "--proxy")?),
            None => match (set("HTTPS_PROXY"), set("https_proxy")) {
                (Some(v), _) => Some(ProxyUrl::parse(&v, "HTTPS_PROXY")?),
                (None, Some(v)) => Some(ProxyUrl::parse(&v, "https_proxy")?),
                (None, None) => None,
            },
        };
        let no_proxy = set("NO_PROXY")
            .or_else(|| set("no_proxy"))
            .unwrap_or_default()
            .split(',')
            .map(|e| {
                let e = e.trim().to_ascii_lowercase();
                let e = e.trim_start_matches("*.").trim_start_matches('.');
                // `host:port` and `[v6]:port`: the host only.
                match e.strip_prefix('[') {
                    Some(v6) => v6.split(']').next().unwrap_or_default().to_owned(),
                    None if e.matches(':').count() == 1 => {
                        e.split(':').next().unwrap_or_default().to_owned()
                    }
                    None => e.to_owned(),
                }
            })
            .filter(|e| !e.is_empty())
            .collect();
        Ok(Self { proxy, no_proxy })
    }

    /// Only `proxy`, for every host.
    pub fn through(proxy: ProxyUrl) -> Self {
        Self {
            proxy: Some(proxy),
            no_proxy: Vec::new(),
        }
    }

    /// The proxy for `host` (a name or IP address, brackets allowed), if any.
    pub fn for_host(&self, host: &str) -> Option<&ProxyUrl> {
        let proxy = self.proxy.as_ref()?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let ip = host.parse::<std::net::IpAddr>().ok();
        let bypass = self.no_proxy.iter().any(|entry| {
            entry == "*"
                || *entry == host
                || (ip.is_none()
                    && host.len() > entry.len()
                    && host.ends_with(entry.as_str())
                    && host.as_bytes()[host.len() - entry.len() - 1] == b'.')
                // A CIDR range (`10.0.0.0/8`, `fd00::/8`) holds the address.
                || ip.zip(entry.parse::<ipnet::IpNet>().ok())
                    .is_some_and(|(ip, net)| net.contains(&ip.to_canonical()))
        });
        (!bypass).then_some(proxy)
    }
}

/// The host of a `host:port` (IPv6 in brackets allowed), brackets removed.
pub fn host_of(address: &str) -> &str {
    let host = match address.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => address,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn proxy_urls_parse_and_never_show_credentials() {
        let p = ProxyUrl::parse("http://u:p%40ss@Proxy.Example:3128/", "--proxy").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.example", 3128));
        assert_eq!(p.basic.as_deref(), Some("dTpwJTQwc3M="));
        assert_eq!(p.to_string(), "http://proxy.example:3128");
        assert_eq!(
            ProxyUrl::parse("10.0.0.1:8080", "x").unwrap().to_string(),
            "http://10.0.0.1:8080"
        );
        assert_eq!(ProxyUrl::parse("http://proxy", "x").unwrap().port, 80);
        assert_eq!(
            ProxyUrl::parse("http://[fd00::1]:3128", "x")
                .unwrap()
                .to_string(),
            "http://[fd00::1]:3128"
        );
        let err = ProxyUrl::parse("https://u:secret@p:443", "HTTPS_PROXY").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        assert!(err.to_string().contains("not supported"), "{err}");
        for bad in [
            "socks5://p:1080",
            "http://p:0",
            "http://p:x",
            "http:///",
            "http://p/x",
        ] {
            assert!(ProxyUrl::parse(bad, "x").is_err(), "{bad}");
        }
    }

    #[test]
    fn the_flag_wins_and_no_proxy_bypasses() {
        let none = ProxySettings::from_sources(None, env(&[])).unwrap();
        assert_eq!(none.for_host("rv.example"), None);
        let from_env = ProxySettings::from_sources(
            None,
            env(&[
                ("https_proxy", "http://lower:1"),
                ("HTTPS_PROXY", "http://upper:2"),
                (
                    "NO_PROXY",
                    " .internal.example, 10.0.0.5:443,[fd00::2], *.corp, 192.168.0.0/16, fd10::/16",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(from_env.for_host("192.168.7.9"), None, "in a CIDR range");
        assert_eq!(from_env.for_host("[fd10::1]"), None);
        assert!(from_env.for_host("192.169.0.1").is_some());
        assert!(from_env.for_host("fd11::1").is_some());
        assert!(
            from_env.for_host("192.168.example").is_some(),
            "a name is not in a range"
        );
        assert_eq!(from_env.for_host("rv.example").unwrap().host, "upper");
        assert_eq!(from_env.for_host("internal.example"), None);
        assert_eq!(from_env.for_host("rv.internal.example"), None);
        assert!(from_env.for_host("notinternal.example").is_some());
        assert_eq!(from_env.for_host("10.0.0.5"), None);
        assert!(from_env.for_host("110.0.0.5").is_some());
        assert_eq!(from_env.for_host("[fd00::2]"), None);
        assert_eq!(from_env.for_host("a.corp"), None);
        let lower =
            ProxySettings::from_sources(None, env(&[("https_proxy", "http://lower:1")])).unwrap();
        assert_eq!(lower.for_host("x").unwrap().host, "lower");
        let flag = ProxySettings::from_sources(
            Some("http://flag:3"),
            env(&[("HTTPS_PROXY", "http://upper:2"), ("no_proxy", "*")]),
        )
        .unwrap();
        assert_eq!(flag.for_host("x"), None, "`*`: no proxy for any host");
        let flag =
            ProxySettings::from_sources(Some("http://flag:3"), env(&[("HTTPS_PROXY", "bad://")]))
                .unwrap();
        assert_eq!(flag.for_host("x").unwrap().host, "flag");
        assert!(
            ProxySettings::from_sources(None, env(&[("HTTPS_PROXY", "ftp://x")]))
                .unwrap_err()
                .to_string()
                .starts_with("proxy HTTPS_PROXY")
        );
        assert_eq!(host_of("rv.example:443"), "rv.example");
        assert_eq!(host_of("[fd00::1]:443"), "fd00::1");
    }
}

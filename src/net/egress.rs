//! Where sources and notifications may connect: the operator's egress policy.
//!
//! A `CohortImport` names its own source URL and its Slack or webhook URL, so without a
//! policy any team could make the operator fetch (or post to) the cloud metadata service
//! (169.254.169.254: node credentials) or any address the operator's pod can reach. The policy is the operator's, set by flags
//! (`--egress-allow`, `--egress-deny`, `--egress-default`; chart values `egress.*`):
//!
//! - a rule is a CIDR (`10.0.0.0/8`, `fd00::/8`), an address (`10.1.2.3`), a host name
//!   (`warehouse.example.com`) or every name under a domain (`*.example.com`);
//! - a `--egress-deny` rule always wins; an `--egress-allow` rule lifts the built-in denials;
//!   the built-in list denies link-local addresses (169.254.0.0/16, fe80::/10) and the cloud
//!   metadata services' addresses and names ([`BUILT_IN_DENY`]); anything no rule names
//!   follows `--egress-default` (`allow`, so in-cluster services and private warehouses work
//!   unless the operator says otherwise).
//!
//! The check applies to the address actually connected to, never only to the name in the
//! URL: HTTP clients resolve names through [`EgressResolver`] (which drops denied addresses
//! and fails when none is left), URLs that name an address (no DNS) are checked with
//! [`EgressPolicy::check_url`], and the address a connection reached is checked again before
//! anything is written on it ([`EgressPolicy::check_connected`]); other drivers (PostgreSQL)
//! resolve with [`EgressPolicy::resolve`] and connect to the checked address. A name that
//! resolves to a denied address a second time (DNS rebinding) is refused the second time too.
//!
//! HTTP clients apply all of it by being built with [`super::http::HttpClient::builder`]:
//! sources, warehouse links and token endpoints, notifications and the Braze endpoint alike.
//!
//! The decision ([`EgressPolicy::check_host`], [`EgressPolicy::check_addr`]) is pure; only
//! [`EgressPolicy::resolve`] and the resolver do I/O.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, LazyLock};

use ipnet::IpNet;
use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// What the operator denies unless an `--egress-allow` rule names it: link-local networks,
/// where every major cloud's instance metadata service answers, and the metadata services'
/// other addresses and names.
pub const BUILT_IN_DENY: &[(&str, &str)] = &[
    ("169.254.0.0/16", "IPv4 link-local (cloud metadata services answer at 169.254.169.254)"),
    ("fe80::/10", "IPv6 link-local"),
    ("fd00:ec2::254", "the AWS instance metadata service over IPv6"),
    ("100.100.100.200", "the Alibaba Cloud metadata service"),
    ("168.63.129.16", "the Azure platform (WireServer) endpoint"),
    ("metadata.google.internal", "the Google Cloud metadata server"),
    ("metadata.goog", "the Google Cloud metadata server"),
    ("instance-data.ec2.internal", "the AWS instance metadata service"),
    ("0.0.0.0/8", "not a destination (unspecified)"),
    ("::/128", "not a destination (unspecified)"),
    ("255.255.255.255/32", "not a destination (broadcast)"),
    ("224.0.0.0/4", "not a destination (multicast)"),
    ("ff00::/8", "not a destination (multicast)"),
];

/// The operator flag a deny rule came from; a refusal names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyFlag {
    /// `--egress-deny`: sources and notifications.
    EgressDeny,
    /// `--notification-deny-cidr`: Slack and webhook reports only.
    NotificationDenyCidr,
}

impl DenyFlag {
    pub const fn as_str(self) -> &'static str {
        match self {
            DenyFlag::EgressDeny => "--egress-deny",
            DenyFlag::NotificationDenyCidr => "--notification-deny-cidr",
        }
    }
}

/// One allow or deny rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EgressRule {
    /// Addresses in a network (an address alone is a /32 or /128).
    Net(IpNet),
    /// Exactly this host name (lowercase, no trailing dot).
    Host(String),
    /// Every name under this domain (`*.example.com`), not the domain itself.
    Domain(String),
}

impl FromStr for EgressRule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Ok(net) = text.parse::<IpNet>() {
            return Ok(EgressRule::Net(net.trunc()));
        }
        if let Ok(addr) = text.parse::<IpAddr>() {
            return Ok(EgressRule::Net(IpNet::from(addr)));
        }
        let (wildcard, name) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let name = normalize_host(name);
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(format!(
                "{text:?} is not an egress rule: give a CIDR (10.0.0.0/8), an address (10.1.2.3), a host name \
                 (warehouse.example.com) or a domain (*.example.com)"
            ));
        }
        Ok(if wildcard { EgressRule::Domain(name) } else { EgressRule::Host(name) })
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // A single address reads better without its /32.
            EgressRule::Net(net) if net.prefix_len() == net.max_prefix_len() => write!(f, "{}", net.addr()),
            EgressRule::Net(net) => write!(f, "{net}"),
            EgressRule::Host(name) => f.write_str(name),
            EgressRule::Domain(name) => write!(f, "*.{name}"),
        }
    }
}

impl EgressRule {
    fn matches_host(&self, host: &str) -> bool {
        match self {
            EgressRule::Net(_) => false,
            EgressRule::Host(name) => host == name,
            EgressRule::Domain(domain) => host.strip_suffix(domain.as_str()).is_some_and(|rest| rest.ends_with('.')),
        }
    }

    fn matches_addr(&self, addr: IpAddr) -> bool {
        match self {
            EgressRule::Net(net) => net.contains(&addr),
            _ => false,
        }
    }
}

/// What happens to a destination no rule names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EgressDefault {
    #[default]
    Allow,
    Deny,
}

/// Why a destination was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// A rule of `flag` names it: `--egress-deny`, or `--notification-deny-cidr` for reports.
    Denied { rule: EgressRule, flag: DenyFlag },
    /// The built-in list names it; `what` says what lives there.
    BuiltIn { rule: EgressRule, what: &'static str },
    /// No rule names it and `--egress-default` is `deny`.
    NotAllowed,
}

/// A refused destination: the host as the source named it, and the address it resolved to
/// (the same when the source named an address). The message names the flag that allows it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct EgressDenied {
    pub host: String,
    pub address: Option<IpAddr>,
    pub reason: DenyReason,
}

impl fmt::Display for EgressDenied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let literal = self.address.is_some_and(|a| a.to_string() == self.host);
        match self.address {
            Some(addr) if !literal => write!(f, "destination {} (address {addr})", self.host)?,
            _ => write!(f, "destination {}", self.host)?,
        }
        f.write_str(" refused by the operator's egress policy: ")?;
        // Allowing exactly what was refused is the narrowest fix to suggest.
        let target = self.address.map_or_else(|| self.host.clone(), |a| a.to_string());
        match &self.reason {
            DenyReason::Denied { rule, flag: DenyFlag::NotificationDenyCidr } => {
                write!(f, "it matches {} {rule}; remove that rule to allow it", DenyFlag::NotificationDenyCidr.as_str())
            }
            DenyReason::Denied { rule, .. } => {
                write!(f, "it matches --egress-deny {rule}; remove that rule (chart value egress.deny) to allow it")
            }
            DenyReason::BuiltIn { rule, what } => write!(
                f,
                "{what} ({rule}) is denied by default; to allow it, start the operator with \
                 --egress-allow={target} (chart value egress.allow)"
            ),
            DenyReason::NotAllowed => write!(
                f,
                "no --egress-allow rule matches it and --egress-default is deny; allow it with \
                 --egress-allow={target} (chart value egress.allow)"
            ),
        }
    }
}

/// One aspect's verdict (the name, or an address).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    Deny(DenyReason),
    Allow,
    Unnamed,
}

/// The operator's egress policy. `Default`: the built-in denials, everything else allowed.
#[derive(Clone, Debug, Default)]
pub struct EgressPolicy {
    allow: Vec<EgressRule>,
    deny: Vec<EgressRule>,
    /// Rules other flags deny, each with its flag.
    deny_by: Vec<(EgressRule, DenyFlag)>,
    default: EgressDefault,
}

static BUILT_IN: LazyLock<Vec<(EgressRule, &'static str)>> = LazyLock::new(|| {
    BUILT_IN_DENY.iter().map(|(rule, what)| (rule.parse().expect("built-in rules parse"), *what)).collect()
});

static DEFAULT_POLICY: LazyLock<Arc<EgressPolicy>> = LazyLock::new(|| Arc::new(EgressPolicy::default()));

impl EgressPolicy {
    pub fn new(allow: Vec<EgressRule>, deny: Vec<EgressRule>, default: EgressDefault) -> Self {
        EgressPolicy { allow, deny, deny_by: Vec::new(), default }
    }

    /// This policy with `rules` of operator flag `flag` denied too (notifications'
    /// `--notification-deny-cidr`); a refusal names that flag.
    pub fn with_deny(mut self, flag: DenyFlag, rules: impl IntoIterator<Item = EgressRule>) -> Self {
        self.deny_by.extend(rules.into_iter().map(|rule| (rule, flag)));
        self
    }

    /// This policy with `rules` allowed too (deny rules still win): for a client that must
    /// reach what the built-in list denies, such as GKE's metadata server for an import
    /// the operator lends its own identity to.
    pub fn with_allow(mut self, rules: impl IntoIterator<Item = EgressRule>) -> Self {
        self.allow.extend(rules);
        self
    }

    /// The policy a source gets when none was configured: [`EgressPolicy::default`].
    pub fn shared_default() -> Arc<EgressPolicy> {
        DEFAULT_POLICY.clone()
    }

    /// One line for the operator's start-up log.
    pub fn summary(&self) -> String {
        let list = |rules: &[EgressRule]| rules.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        let built_in = BUILT_IN.iter().map(|(r, _)| r.to_string()).collect::<Vec<_>>().join(",");
        let default = match self.default {
            EgressDefault::Allow => "allow",
            EgressDefault::Deny => "deny",
        };
        let deny_by = self.deny_by.iter().map(|(r, flag)| format!(" {} {r}", flag.as_str())).collect::<String>();
        format!(
            "default {default}; deny [{}]; allow [{}]; built-in deny [{built_in}];{deny_by}",
            list(&self.deny),
            list(&self.allow)
        )
    }

    fn verdict(&self, matches: impl Fn(&EgressRule) -> bool) -> Verdict {
        if let Some(rule) = self.deny.iter().find(|r| matches(r)) {
            return Verdict::Deny(DenyReason::Denied { rule: rule.clone(), flag: DenyFlag::EgressDeny });
        }
        if let Some((rule, flag)) = self.deny_by.iter().find(|(r, _)| matches(r)) {
            return Verdict::Deny(DenyReason::Denied { rule: rule.clone(), flag: *flag });
        }
        if self.allow.iter().any(&matches) {
            return Verdict::Allow;
        }
        match BUILT_IN.iter().find(|(r, _)| matches(r)) {
            Some((rule, what)) => Verdict::Deny(DenyReason::BuiltIn { rule: rule.clone(), what }),
            None => Verdict::Unnamed,
        }
    }

    fn host_verdict(&self, host: &str) -> Verdict {
        let host = normalize_host(host);
        self.verdict(|r| r.matches_host(&host))
    }

    fn addr_verdict(&self, addr: IpAddr) -> Verdict {
        let addrs = embedded(addr);
        self.verdict(|r| addrs.iter().any(|a| r.matches_addr(*a)))
    }

    /// The name alone, before it is resolved: refused when a rule denies the name (or, for
    /// an address written as the host, the address).
    pub fn check_host(&self, host: &str) -> Result<(), EgressDenied> {
        if let Some(addr) = literal_addr(host) {
            return self.check_addr(host, addr);
        }
        match self.host_verdict(host) {
            Verdict::Deny(reason) => Err(EgressDenied { host: host.to_owned(), address: None, reason }),
            _ => Ok(()),
        }
    }

    /// Connecting to `addr` for `host`. A denial of either wins; then an allow of either;
    /// then `--egress-default`.
    pub fn check_addr(&self, host: &str, addr: IpAddr) -> Result<(), EgressDenied> {
        let denied = |reason| Err(EgressDenied { host: host.to_owned(), address: Some(addr), reason });
        let by_name = if literal_addr(host).is_some() { Verdict::Unnamed } else { self.host_verdict(host) };
        let by_addr = self.addr_verdict(addr);
        match (by_name, by_addr) {
            (Verdict::Deny(reason), _) | (_, Verdict::Deny(reason)) => denied(reason),
            (Verdict::Allow, _) | (_, Verdict::Allow) => Ok(()),
            (Verdict::Unnamed, Verdict::Unnamed) => match self.default {
                EgressDefault::Allow => Ok(()),
                EgressDefault::Deny => denied(DenyReason::NotAllowed),
            },
        }
    }

    /// The address a connection reached, whatever name or URL led there: refused only when
    /// a deny rule or the built-in list names the address. (An unnamed address under
    /// `--egress-default=deny` was refused before connecting, by its URL or its name; an
    /// allowed name may resolve to one.)
    pub fn check_connected(&self, addr: IpAddr) -> Result<(), EgressDenied> {
        match self.addr_verdict(addr) {
            Verdict::Deny(reason) => Err(EgressDenied { host: addr.to_string(), address: Some(addr), reason }),
            Verdict::Allow | Verdict::Unnamed => Ok(()),
        }
    }

    /// A URL's host ([`EgressPolicy::check_host`]): an address in the URL is connected to
    /// without DNS, so this is its only check; a name is checked again once resolved.
    pub fn check_url(&self, url: &Url) -> Result<(), EgressDenied> {
        match url.host() {
            None => Ok(()),
            Some(url::Host::Domain(name)) => self.check_host(name),
            Some(url::Host::Ipv4(v4)) => self.check_addr(&v4.to_string(), IpAddr::V4(v4)),
            Some(url::Host::Ipv6(v6)) => self.check_addr(&v6.to_string(), IpAddr::V6(v6)),
        }
    }

    /// Resolves `host` and keeps the addresses the policy allows (port `port` on each).
    /// Fails with the first denial when none is left. For drivers that connect themselves:
    /// connect to what this returns, never to the name again.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
        self.check_host(host)?;
        let found: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|source| ResolveError::Lookup { host: host.to_owned(), source: Arc::new(source) })?
            .collect();
        self.keep_allowed(host, found)
    }

    /// The allowed ones of `found`, the addresses `host` resolved to.
    pub fn keep_allowed(&self, host: &str, found: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, ResolveError> {
        let mut first_denial = None;
        let mut allowed = Vec::with_capacity(found.len());
        for addr in found {
            match self.check_addr(host, addr.ip()) {
                Ok(()) => allowed.push(addr),
                Err(denied) => {
                    tracing::warn!(%denied, "egress: a resolved address was dropped");
                    first_denial.get_or_insert(denied);
                }
            }
        }
        match (allowed.is_empty(), first_denial) {
            (true, Some(denied)) => Err(ResolveError::Denied(denied)),
            _ => Ok(allowed),
        }
    }
}

/// Why [`EgressPolicy::resolve`] gave no address.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Denied(#[from] EgressDenied),
    #[error("cannot resolve {host}: {source}")]
    Lookup { host: String, source: Arc<std::io::Error> },
}

/// Lowercase, without the trailing dot of a fully qualified name.
fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// `host` when it is an address (`10.0.0.1`, `::1`, `[::1]`).
fn literal_addr(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// The address and the IPv4 address it carries, if any: an IPv4-mapped address
/// (`::ffff:169.254.169.254`) or one in the NAT64 prefix (`64:ff9b::a9fe:a9fe`) reaches
/// that IPv4 address, so the IPv4 rules apply to it too.
fn embedded(addr: IpAddr) -> Vec<IpAddr> {
    let mut all = vec![addr];
    if let IpAddr::V6(v6) = addr {
        if let Some(v4) = v6.to_ipv4_mapped() {
            all.push(IpAddr::V4(v4));
        }
        let s = v6.segments();
        if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
            let [a, b] = s[6].to_be_bytes();
            let [c, d] = s[7].to_be_bytes();
            all.push(IpAddr::V4(Ipv4Addr::new(a, b, c, d)));
        }
    }
    all
}

/// The first [`EgressDenied`] in an error's chain of sources (a reqwest error wraps the
/// resolver's or the redirect policy's).
pub fn denied_in<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a EgressDenied> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(denied) = e.downcast_ref::<EgressDenied>() {
            return Some(denied);
        }
        next = e.source();
    }
    None
}

// --- HTTP clients ----------------------------------------------------------------------

/// reqwest's DNS resolver under the policy: the names a client connects to — first URL,
/// redirects, next pages — are resolved here, and only allowed addresses are returned.
#[derive(Clone, Debug)]
pub struct EgressResolver(pub Arc<EgressPolicy>);

impl Resolve for EgressResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            match policy.resolve(&host, 0).await {
                Ok(addrs) => Ok(Box::new(addrs.into_iter()) as Addrs),
                // The denial itself, so that `denied_in` finds it in reqwest's error.
                Err(ResolveError::Denied(denied)) => Err(Box::new(denied) as Box<dyn std::error::Error + Send + Sync>),
                Err(ResolveError::Lookup { source, .. }) => {
                    Err(Box::new(std::io::Error::new(source.kind(), source.to_string())) as _)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    //! Pure: no test here opens a connection or resolves a name.
    use super::*;

    fn rules(list: &[&str]) -> Vec<EgressRule> {
        list.iter().map(|r| r.parse().unwrap()).collect()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn another_flags_rules_deny_even_what_is_allowed_and_are_named_by_it() {
        let policy = EgressPolicy::new(rules(&["10.0.0.0/8"]), vec![], EgressDefault::Allow)
            .with_deny(DenyFlag::NotificationDenyCidr, rules(&["10.1.0.0/16"]));
        let err = policy.check_addr("10.1.2.3", ip("10.1.2.3")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "destination 10.1.2.3 refused by the operator's egress policy: it matches --notification-deny-cidr \
             10.1.0.0/16; remove that rule to allow it"
        );
        assert_eq!(policy.check_addr("10.2.0.1", ip("10.2.0.1")), Ok(()));
    }

    #[test]
    fn the_default_denies_link_local_and_metadata_addresses() {
        let policy = EgressPolicy::default();
        for addr in [
            "169.254.169.254",
            "169.254.170.2",
            "169.254.0.1",
            "fe80::1",
            "fe80::a9fe:a9fe",
            "fd00:ec2::254",
            "100.100.100.200",
            "168.63.129.16",
            // IPv4 written as IPv6 reaches the same IPv4 address.
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            // Not destinations at all.
            "0.0.0.0",
            "::",
            "255.255.255.255",
            "224.0.0.1",
            "ff02::1",
        ] {
            let err = policy.check_addr(addr, ip(addr)).unwrap_err();
            assert!(matches!(err.reason, DenyReason::BuiltIn { .. }), "{addr}: {err}");
            assert!(err.to_string().contains(&format!("--egress-allow={}", ip(addr))), "{err}");
        }
        for host in
            ["metadata.google.internal", "METADATA.google.internal.", "metadata.goog", "instance-data.ec2.internal"]
        {
            let err = policy.check_host(host).unwrap_err();
            assert!(err.to_string().contains("Google Cloud") || err.to_string().contains("AWS"), "{err}");
        }
        // A harmless name that resolves to the metadata address is refused by the address.
        let err = policy.check_addr("cohorts.example.com", ip("169.254.169.254")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "destination cohorts.example.com (address 169.254.169.254) refused by the operator's egress policy: \
             IPv4 link-local (cloud metadata services answer at 169.254.169.254) (169.254.0.0/16) is denied by \
             default; to allow it, start the operator with --egress-allow=169.254.169.254 (chart value egress.allow)"
        );
    }

    #[test]
    fn the_default_allows_private_in_cluster_public_and_loopback_addresses() {
        let policy = EgressPolicy::default();
        for addr in
            ["10.0.0.5", "172.16.3.4", "192.168.1.10", "fd12:3456::1", "203.0.113.7", "2001:db8::1", "127.0.0.1", "::1"]
        {
            policy.check_addr("warehouse.internal", ip(addr)).unwrap_or_else(|e| panic!("{addr}: {e}"));
        }
        policy.check_host("warehouse.analytics.svc.cluster.local").unwrap();
        policy.check_host("metadata.google.internal.example.com").unwrap();
    }

    #[test]
    fn deny_rules_win_and_name_the_flag() {
        let policy = EgressPolicy::new(
            rules(&["127.0.0.0/8"]),
            rules(&["127.0.0.2/32", "*.blocked.example"]),
            EgressDefault::Allow,
        );
        let err = policy.check_addr("127.0.0.2", ip("127.0.0.2")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "destination 127.0.0.2 refused by the operator's egress policy: it matches --egress-deny 127.0.0.2; \
             remove that rule (chart value egress.deny) to allow it"
        );
        policy.check_addr("127.0.0.1", ip("127.0.0.1")).unwrap();
        let err = policy.check_host("api.blocked.example").unwrap_err();
        assert_eq!(
            err.reason,
            DenyReason::Denied { rule: EgressRule::Domain("blocked.example".into()), flag: DenyFlag::EgressDeny }
        );
        // The domain rule is for names under it, not the domain itself.
        policy.check_host("blocked.example").unwrap();
        // A denied name is refused whatever it resolves to, an allowed address included.
        assert!(policy.check_addr("x.blocked.example", ip("127.0.0.1")).is_err());
    }

    #[test]
    fn an_allow_rule_lifts_a_built_in_denial_and_a_default_deny() {
        let policy = EgressPolicy::new(rules(&["169.254.10.10"]), vec![], EgressDefault::Allow);
        policy.check_addr("169.254.10.10", ip("169.254.10.10")).unwrap();
        assert!(policy.check_addr("169.254.169.254", ip("169.254.169.254")).is_err());

        let policy = EgressPolicy::new(rules(&["10.0.0.0/8", "warehouse.example.com"]), vec![], EgressDefault::Deny);
        policy.check_addr("db.internal", ip("10.2.3.4")).unwrap();
        // An allowed name may resolve anywhere — except where a denial says no.
        policy.check_addr("warehouse.example.com", ip("203.0.113.9")).unwrap();
        assert!(policy.check_addr("warehouse.example.com", ip("169.254.169.254")).is_err());
        let err = policy.check_addr("elsewhere.example.com", ip("203.0.113.9")).unwrap_err();
        assert_eq!(err.reason, DenyReason::NotAllowed);
        assert!(
            err.to_string().contains("--egress-default is deny; allow it with --egress-allow=203.0.113.9"),
            "{err}"
        );
        // Before resolution, an unnamed host is not refused yet: its address decides.
        policy.check_host("elsewhere.example.com").unwrap();
    }

    #[test]
    fn urls_with_addresses_are_checked_as_addresses() {
        let policy = EgressPolicy::new(vec![], rules(&["127.0.0.2", "::2"]), EgressDefault::Allow);
        let url = |s: &str| Url::parse(s).unwrap();
        assert!(policy.check_url(&url("http://127.0.0.2:8080/export.csv")).is_err());
        assert!(policy.check_url(&url("http://[::2]:8080/export.csv")).is_err());
        assert!(policy.check_url(&url("http://169.254.169.254/latest/meta-data/")).is_err());
        assert!(policy.check_url(&url("http://metadata.google.internal/computeMetadata/v1/")).is_err());
        // The url crate reads decimal and hex IPv4 forms as the address they are.
        assert!(policy.check_url(&url("http://2852039166/")).is_err());
        assert!(policy.check_url(&url("http://0xA9.0xFE.0xA9.0xFE/")).is_err());
        policy.check_url(&url("http://127.0.0.1:8080/export.csv")).unwrap();
    }

    #[test]
    fn resolved_addresses_are_filtered_and_none_left_is_a_denial() {
        let policy = EgressPolicy::new(vec![], rules(&["127.0.0.2"]), EgressDefault::Allow);
        let found = vec!["127.0.0.2:80".parse().unwrap(), "127.0.0.1:80".parse().unwrap()];
        assert_eq!(policy.keep_allowed("export.test", found).unwrap(), vec!["127.0.0.1:80".parse().unwrap()]);
        let err = policy.keep_allowed("export.test", vec!["127.0.0.2:80".parse().unwrap()]).unwrap_err();
        assert!(matches!(&err, ResolveError::Denied(d) if d.host == "export.test"), "{err}");
        assert!(err.to_string().contains("destination export.test (address 127.0.0.2)"), "{err}");
    }

    #[test]
    fn rules_parse_and_print() {
        for (text, shown) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("10.1.2.3/8", "10.0.0.0/8"),
            ("10.1.2.3", "10.1.2.3"),
            ("fd00::/8", "fd00::/8"),
            ("Warehouse.Example.COM.", "warehouse.example.com"),
            ("*.example.com", "*.example.com"),
            ("metadata", "metadata"),
        ] {
            assert_eq!(text.parse::<EgressRule>().unwrap().to_string(), shown);
        }
        for bad in ["", "*.", "http://x", "a..b", "-x.com", "10.0.0.0/33", "x_y.com"] {
            let err = bad.parse::<EgressRule>().unwrap_err();
            assert!(err.contains("not an egress rule"), "{bad}: {err}");
        }
    }

    #[test]
    fn denials_are_found_in_an_error_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] EgressDenied);
        let denied = EgressPolicy::default().check_host("metadata.goog").unwrap_err();
        let outer = Outer(denied.clone());
        assert_eq!(denied_in(&outer), Some(&denied));
        assert_eq!(denied_in(&std::io::Error::other("x")), None);
    }
}

//! Where notifications may go. Pure: addresses in, a verdict out.
//!
//! Slack and webhook URLs come from Secrets that teams write, and the operator posts to them
//! from inside the cluster, so a URL must not reach what only the cluster can: the link-local
//! range (cloud metadata services at 169.254.169.254 and friends hand out node credentials),
//! their IPv6 forms, and addresses that are not destinations at all (unspecified, broadcast,
//! multicast). Private ranges stay allowed: in-cluster receivers (Alertmanager-style
//! bridges, chat relays) live there, and they are the operator's to trust.
//!
//! The check is on the *resolved* address, at connection time (see `http::DenyingResolver`),
//! so a name that resolves to a metadata address is refused as surely as the literal one, and
//! a name that changes its answer between a check and the connection gains nothing.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Networks no notification is sent to, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationPolicy {
    denied: Vec<(IpNet, &'static str)>,
}

/// Why an address is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Denied {
    pub network: IpNet,
    pub why: &'static str,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is {}", self.network, self.why)
    }
}

const LINK_LOCAL: &str = "link-local (cloud metadata services live there)";
const METADATA: &str = "a cloud metadata service";
const NOT_A_DESTINATION: &str = "not a destination (unspecified, broadcast or multicast)";

impl Default for DestinationPolicy {
    fn default() -> Self {
        let net = |text: &str, why| (text.parse::<IpNet>().expect("a valid network"), why);
        Self {
            denied: vec![
                net("169.254.0.0/16", LINK_LOCAL),
                net("fe80::/10", LINK_LOCAL),
                // AWS's IPv6 instance metadata; Alibaba Cloud's metadata service.
                net("fd00:ec2::254/128", METADATA),
                net("100.100.100.200/32", METADATA),
                net("0.0.0.0/8", NOT_A_DESTINATION),
                net("::/128", NOT_A_DESTINATION),
                net("255.255.255.255/32", NOT_A_DESTINATION),
                net("224.0.0.0/4", NOT_A_DESTINATION),
                net("ff00::/8", NOT_A_DESTINATION),
            ],
        }
    }
}

impl DestinationPolicy {
    /// The default list plus `networks` (the operator's `--notification-deny-cidr`; tests
    /// put loopback addresses here to see a refusal).
    pub fn with_denied(mut self, networks: impl IntoIterator<Item = IpNet>) -> Self {
        self.denied.extend(networks.into_iter().map(|n| (n, "on the operator's deny list")));
        self
    }

    /// `Err` when `address` is in a denied network. An IPv4 address written as IPv6
    /// (`::ffff:169.254.169.254`, or the NAT64 well-known prefix) is judged as IPv4.
    pub fn check(&self, address: IpAddr) -> Result<(), Denied> {
        let candidates = [Some(address), embedded_v4(address).map(IpAddr::V4)];
        for ip in candidates.into_iter().flatten() {
            if let Some((network, why)) = self.denied.iter().find(|(net, _)| net.contains(&ip)) {
                return Err(Denied { network: *network, why });
            }
        }
        Ok(())
    }
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`) or NAT64 (`64:ff9b::a.b.c.d`)
/// IPv6 address.
fn embedded_v4(address: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = address else { return None };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let nat64 = Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0);
    let octets = v6.octets();
    (octets[..12] == nat64.octets()[..12]).then(|| Ipv4Addr::new(octets[12], octets[13], octets[14], octets[15]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn metadata_and_link_local_are_refused_in_every_spelling() {
        let policy = DestinationPolicy::default();
        for denied in [
            "169.254.169.254",
            "169.254.0.1",
            "fe80::1",
            "fd00:ec2::254",
            "100.100.100.200",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(policy.check(ip(denied)).is_err(), "{denied}");
        }
        let refusal = policy.check(ip("169.254.169.254")).unwrap_err();
        assert_eq!(refusal.to_string(), "169.254.0.0/16 is link-local (cloud metadata services live there)");
    }

    #[test]
    fn public_private_and_loopback_addresses_pass_by_default() {
        let policy = DestinationPolicy::default();
        for allowed in ["127.0.0.1", "::1", "10.0.0.8", "192.168.1.1", "172.16.0.1", "203.0.113.7", "2001:db8::1"] {
            assert_eq!(policy.check(ip(allowed)), Ok(()), "{allowed}");
        }
    }

    #[test]
    fn the_operator_can_deny_more() {
        let policy = DestinationPolicy::default().with_denied(["127.0.0.2/32".parse().unwrap()]);
        assert!(policy.check(ip("127.0.0.2")).is_err());
        assert!(policy.check(ip("::ffff:127.0.0.2")).is_err());
        assert_eq!(policy.check(ip("127.0.0.1")), Ok(()));
    }
}

//! Which addresses kstash may deliver to (SSRF protection).
//!
//! Loopback, private, link-local (including cloud metadata at 169.254.169.254), CGNAT, multicast,
//! broadcast and unspecified addresses are refused unless an allow-listed network contains them.
//! The check runs after DNS resolution, inside the HTTP client's resolver, on every connection, so
//! a name that re-resolves to an internal address is caught too; IP-literal hosts (which skip the
//! resolver) are checked before the request. Redirects are not followed (see `http.rs`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Networks that are refused by default.
#[derive(Debug, Clone, Default)]
pub struct DestinationPolicy {
    allowed: Vec<IpNet>,
}

impl DestinationPolicy {
    pub fn new(allowed: Vec<IpNet>) -> Self {
        DestinationPolicy { allowed }
    }

    /// Whether kstash may connect to `ip`.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.allowed.iter().any(|net| net.contains(&ip)) || is_public(ip)
    }
}

/// IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    let cgnat = a == 100 && (64..128).contains(&b); // 100.64.0.0/10
    let this_network = a == 0; // 0.0.0.0/8
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_unspecified()
        || ip.is_documentation()
        || cgnat
        || this_network)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    let unique_local = (first & 0xfe00) == 0xfc00; // fc00::/7
    let link_local = (first & 0xffc0) == 0xfe80; // fe80::/10
    !(ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || unique_local || link_local)
}

/// A DNS resolver that drops addresses the policy refuses, failing when none remain.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    policy: Arc<DestinationPolicy>,
}

impl GuardedResolver {
    pub fn new(policy: Arc<DestinationPolicy>) -> Self {
        GuardedResolver { policy }
    }
}

/// The destination resolved only to refused addresses.
#[derive(Debug, thiserror::Error)]
#[error("destination {0} resolves only to addresses kstash does not deliver to (loopback/private/link-local); allow them with delivery.allowed_networks")]
pub struct RefusedDestination(pub String);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            // Port 0: reqwest replaces it with the URL's port.
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let permitted: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|a| policy.permits(a.ip()))
                .collect();
            if permitted.is_empty() {
                return Err(Box::new(RefusedDestination(host)) as _);
            }
            Ok(Box::new(permitted.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn refuses_internal_addresses_by_default() {
        let p = DestinationPolicy::default();
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(!p.permits(ip(bad)), "{bad} must be refused");
        }
        for good in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(p.permits(ip(good)), "{good} must be allowed");
        }
    }

    #[test]
    fn allow_list_opens_networks() {
        let p = DestinationPolicy::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "10.1.0.0/16".parse().unwrap(),
        ]);
        assert!(p.permits(ip("127.0.0.1")));
        assert!(p.permits(ip("10.1.9.9")));
        assert!(!p.permits(ip("10.2.0.1")));
        assert!(!p.permits(ip("169.254.169.254")));
    }

    #[tokio::test]
    async fn resolver_drops_refused_addresses() {
        let refuse = GuardedResolver::new(Arc::new(DestinationPolicy::default()));
        let err = refuse.resolve("localhost".parse().unwrap()).await.err();
        assert!(
            err.is_some(),
            "localhost must not resolve to a permitted address"
        );
        let allow = GuardedResolver::new(Arc::new(DestinationPolicy::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ])));
        let addrs: Vec<_> = allow
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(!addrs.is_empty());
    }
}

//! Which addresses kstash may deliver to (SSRF protection).
//!
//! Loopback, private, link-local (including cloud metadata at 169.254.169.254), CGNAT, multicast,
//! broadcast, unspecified, documentation, benchmarking (198.18.0.0/15), IETF protocol
//! (192.0.0.0/24), reserved (240.0.0.0/4) and IPv6 site-local, IPv4-compatible and Teredo
//! addresses are refused unless an allow-listed network contains them. IPv6 addresses that carry
//! an IPv4 address a translator or relay will reach (IPv4-mapped `::ffff:0:0/96`, NAT64
//! `64:ff9b::/96`, 6to4 `2002::/16`) are judged as that IPv4 address.
//!
//! The check runs after DNS resolution, inside the HTTP client's resolver, on every connection, so
//! a name that re-resolves to an internal address is caught too; IP-literal hosts (which skip the
//! resolver) are checked before the request. Through a configured proxy (which resolves the
//! destination itself) the destination is resolved and checked before each attempt, every address
//! it resolves to must be permitted, and only the proxy's own host is resolved unguarded.
//! Redirects are not followed (see `http.rs`).

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

/// First segment of the NAT64 well-known prefix `64:ff9b::/96`.
const NAT64_FIRST: u16 = 0x0064;
/// Second segment of the NAT64 well-known prefix.
const NAT64_SECOND: u16 = 0xff9b;
/// First segment of 6to4 addresses (`2002::/16`); the next two segments are the IPv4 address.
const SIX_TO_FOUR_FIRST: u16 = 0x2002;

/// IPv6 addresses that lead to an IPv4 address (IPv4-mapped, NAT64, 6to4) are judged as it.
fn canonical(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else {
        return ip;
    };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let s = v6.segments();
    let embedded = |high: u16, low: u16| {
        let [a, b] = high.to_be_bytes();
        let [c, d] = low.to_be_bytes();
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    };
    if s[0] == NAT64_FIRST && s[1] == NAT64_SECOND && s[2..6] == [0, 0, 0, 0] {
        return embedded(s[6], s[7]);
    }
    if s[0] == SIX_TO_FOUR_FIRST {
        return embedded(s[1], s[2]);
    }
    ip
}

fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    let cgnat = a == 100 && (64..128).contains(&b); // 100.64.0.0/10
    let this_network = a == 0; // 0.0.0.0/8
    let ietf_protocol = a == 192 && b == 0 && c == 0; // 192.0.0.0/24
    let benchmarking = a == 198 && (b & 0xfe) == 18; // 198.18.0.0/15
    let reserved = a >= 240; // 240.0.0.0/4, broadcast included
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_unspecified()
        || ip.is_documentation()
        || cgnat
        || this_network
        || ietf_protocol
        || benchmarking
        || reserved)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let first = s[0];
    let unique_local = (first & 0xfe00) == 0xfc00; // fc00::/7
    let link_local = (first & 0xffc0) == 0xfe80; // fe80::/10
    let site_local = (first & 0xffc0) == 0xfec0; // fec0::/10 (deprecated, routed internally)
                                                 // ::/96: the unspecified and loopback addresses and the deprecated IPv4-compatible form.
    let ipv4_compatible = s[..6] == [0, 0, 0, 0, 0, 0];
    let teredo = first == 0x2001 && s[1] == 0; // 2001::/32, a tunnel to an obfuscated IPv4 address
    let documentation = first == 0x2001 && s[1] == 0x0db8; // 2001:db8::/32
                                                           // 64:ff9b:1::/48, NAT64 for local use: translates to whatever the site chooses.
    let local_nat64 = first == NAT64_FIRST && s[1] == NAT64_SECOND && s[2] == 1;
    let discard = first == 0x0100 && s[1..4] == [0, 0, 0]; // 100::/64
    !(ip.is_multicast()
        || unique_local
        || link_local
        || site_local
        || ipv4_compatible
        || teredo
        || documentation
        || local_nat64
        || discard)
}

/// A DNS resolver that drops addresses the policy refuses, failing when none remain.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    policy: Arc<DestinationPolicy>,
    /// A host resolved without the guard: the configured proxy, which the operator chose.
    trusted: Option<String>,
}

impl GuardedResolver {
    pub fn new(policy: Arc<DestinationPolicy>, trusted: Option<String>) -> Self {
        GuardedResolver { policy, trusted }
    }
}

/// Resolves `host` and fails unless every address it resolves to is permitted: for deliveries
/// through a proxy, which resolves the name again and may pick any of them.
pub async fn check_host(policy: &DestinationPolicy, host: &str) -> Result<(), String> {
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
        .await
        .map_err(|e| format!("cannot resolve destination {host}: {e}"))?
        .collect();
    match resolved.iter().find(|a| !policy.permits(a.ip())) {
        Some(refused) => Err(format!(
            "destination {host} resolves to {}, an address kstash does not deliver to (loopback/private/link-local); allow it with delivery.allowed_networks",
            refused.ip()
        )),
        None if resolved.is_empty() => Err(format!("destination {host} has no address")),
        None => Ok(()),
    }
}

/// The destination resolved only to refused addresses.
#[derive(Debug, thiserror::Error)]
#[error("destination {0} resolves only to addresses kstash does not deliver to (loopback/private/link-local); allow them with delivery.allowed_networks")]
pub struct RefusedDestination(pub String);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let trusted = self.trusted.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            // Port 0: reqwest replaces it with the URL's port.
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if trusted.as_deref() == Some(host.as_str()) {
                return Ok(Box::new(resolved.into_iter()) as Addrs);
            }
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
            // Ranges that lead inside or nowhere public.
            "192.0.0.1",
            "198.18.0.1",
            "198.19.255.255",
            "240.0.0.1",
            "250.1.2.3",
            "fec0::1",
            "::7f00:1",
            "::a9fe:a9fe",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:db8::1",
            "64:ff9b:1::a00:1",
            "100::1",
            // Translators and relays to internal IPv4 addresses.
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::a00:1",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::",
            "2002:c0a8:101::1",
        ] {
            assert!(!p.permits(ip(bad)), "{bad} must be refused");
        }
        for good in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "198.20.0.1",
            "192.0.1.1",
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
        let refuse = GuardedResolver::new(Arc::new(DestinationPolicy::default()), None);
        let err = refuse.resolve("localhost".parse().unwrap()).await.err();
        assert!(
            err.is_some(),
            "localhost must not resolve to a permitted address"
        );
        let allow = GuardedResolver::new(
            Arc::new(DestinationPolicy::new(vec![
                "127.0.0.0/8".parse().unwrap(),
                "::1/128".parse().unwrap(),
            ])),
            None,
        );
        let addrs: Vec<_> = allow
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(!addrs.is_empty());
        let trusting = GuardedResolver::new(
            Arc::new(DestinationPolicy::default()),
            Some("localhost".into()),
        );
        assert!(
            trusting.resolve("localhost".parse().unwrap()).await.is_ok(),
            "the trusted (proxy) host resolves unguarded"
        );
    }

    #[tokio::test]
    async fn through_a_proxy_every_address_must_be_permitted() {
        let p = DestinationPolicy::default();
        let err = check_host(&p, "localhost").await.unwrap_err();
        assert!(err.contains("does not deliver to"), "{err}");
        let allowed = DestinationPolicy::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ]);
        assert_eq!(check_host(&allowed, "localhost").await, Ok(()));
    }
}

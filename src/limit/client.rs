//! Who a request comes from, for per-client limits.
//!
//! The socket peer is the client unless it is one of the configured trusted proxies. Only
//! then is the forwarding header read, and it is walked from the right: each trusted proxy
//! appends the address it saw, so the right-most entries are the only ones nobody outside
//! could have written. The first untrusted address from the right is the client; anything
//! further left was sent by that client and is ignored. A header that cannot be parsed where
//! it matters yields the peer, never a guess.
//!
//! Per-client buckets are keyed by [`ClientKey`]: an IPv4 address, or the /64 network of an
//! IPv6 address. A single IPv6 subscriber is routinely given a whole /64, so keying on full
//! IPv6 addresses would hand every client 2^64 fresh buckets (and us 2^64 map entries).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use http::header::{HeaderMap, FORWARDED};
use ipnet::IpNet;
use serde::Deserialize;

/// The forwarding header trusted proxies write the client address to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (nginx, HAProxy, most load balancers).
    #[default]
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client;proto=https, for="[2001:db8::1]:4711"`.
    #[serde(rename = "forwarded")]
    Forwarded,
}

const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// The client address of a request that arrived from `peer`.
///
/// `trusted` lists the proxies whose `header` is believed. IPv4-mapped IPv6 addresses
/// (`::ffff:192.0.2.1`, as dual-stack sockets report IPv4 peers) are returned, and matched
/// against `trusted`, as IPv4.
pub fn client_ip(
    peer: SocketAddr,
    headers: &HeaderMap,
    trusted: &[IpNet],
    header: ForwardedHeader,
) -> IpAddr {
    let peer = peer.ip().to_canonical();
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let hops = match header {
        ForwardedHeader::XForwardedFor => x_forwarded_for(headers),
        ForwardedHeader::Forwarded => forwarded(headers),
    };
    let Some(hops) = hops else {
        return peer;
    };
    // From the right: skip our own proxies; the first address they did not vouch for is
    // the client. If every hop is trusted the request started inside, at the left-most one.
    let mut client = peer;
    for hop in hops.into_iter().rev() {
        let Some(ip) = hop else {
            return peer;
        };
        client = ip.to_canonical();
        if !is_trusted(client, trusted) {
            break;
        }
    }
    client
}

fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&ip))
}

/// The hops of every `X-Forwarded-For` line, in order; `None` for an entry that is not an
/// address. `None` overall when a line is not visible ASCII.
fn x_forwarded_for(headers: &HeaderMap) -> Option<Vec<Option<IpAddr>>> {
    let mut hops = Vec::new();
    for line in headers.get_all(X_FORWARDED_FOR) {
        let line = line.to_str().ok()?;
        hops.extend(line.split(',').map(|entry| node_ip(entry.trim())));
    }
    Some(hops)
}

/// The `for=` node of every `Forwarded` element, in order; `None` for an element without
/// `for=` or whose node is not an address (`unknown`, obfuscated `_id`).
fn forwarded(headers: &HeaderMap) -> Option<Vec<Option<IpAddr>>> {
    let mut hops = Vec::new();
    for line in headers.get_all(FORWARDED) {
        let line = line.to_str().ok()?;
        for element in split_unquoted(line, ',') {
            let node = split_unquoted(element, ';').find_map(|pair| {
                let (name, value) = pair.split_once('=')?;
                name.trim()
                    .eq_ignore_ascii_case("for")
                    .then(|| unquote(value.trim()))
            });
            hops.push(node.flatten().as_deref().and_then(node_ip));
        }
    }
    Some(hops)
}

/// Splits at `sep` outside double-quoted strings (which may contain `\"`).
fn split_unquoted(s: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut rest = Some(s);
    std::iter::from_fn(move || {
        let s = rest?;
        let (mut quoted, mut escaped) = (false, false);
        for (i, c) in s.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                c if c == sep && !quoted => {
                    rest = Some(&s[i + c.len_utf8()..]);
                    return Some(&s[..i]);
                }
                _ => {}
            }
        }
        rest = None;
        Some(s)
    })
}

/// A token as is, or a quoted-string with its escapes resolved; `None` if a quote is open.
fn unquote(value: &str) -> Option<String> {
    let Some(inner) = value.strip_prefix('"') else {
        return Some(value.to_owned());
    };
    let inner = inner.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        out.push(if c == '\\' { chars.next()? } else { c });
    }
    Some(out)
}

/// An address from a node: `192.0.2.1`, `192.0.2.1:80`, `2001:db8::1`, `[2001:db8::1]`,
/// `[2001:db8::1]:80`.
fn node_ip(node: &str) -> Option<IpAddr> {
    if let Some(bracketed) = node.strip_prefix('[') {
        let (v6, after) = bracketed.split_once(']')?;
        if !(after.is_empty() || valid_port(after.strip_prefix(':')?)) {
            return None;
        }
        return v6.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    let (v4, port) = node.split_once(':')?;
    if !valid_port(port) {
        return None;
    }
    v4.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

/// A numeric port, or an RFC 7239 obfuscated one (`_abc`).
fn valid_port(port: &str) -> bool {
    port.parse::<u16>().is_ok()
        || (port.len() > 1
            && port.starts_with('_')
            && port[1..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-'))
}

/// The key of a client's bucket: its IPv4 address, or the /64 its IPv6 address lies in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// An IPv4 client (IPv4-mapped IPv6 addresses included).
    V4(u32),
    /// The upper 64 bits of an IPv6 client address.
    V6Net(u64),
}

impl From<IpAddr> for ClientKey {
    fn from(ip: IpAddr) -> ClientKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => ClientKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => ClientKey::V6Net((u128::from(v6) >> 64) as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test network")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn peer(s: &str) -> SocketAddr {
        SocketAddr::new(ip(s), 40_000)
    }

    fn headers(name: &'static str, lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for line in lines {
            h.append(name, HeaderValue::from_str(line).expect("test header"));
        }
        h
    }

    fn proxies() -> Vec<IpNet> {
        vec![net("10.0.0.0/8"), net("2001:db8:ffff::/48")]
    }

    fn xff(from: &str, lines: &[&str]) -> IpAddr {
        client_ip(
            peer(from),
            &headers(X_FORWARDED_FOR, lines),
            &proxies(),
            ForwardedHeader::XForwardedFor,
        )
    }

    fn fwd(from: &str, lines: &[&str]) -> IpAddr {
        client_ip(
            peer(from),
            &headers("forwarded", lines),
            &proxies(),
            ForwardedHeader::Forwarded,
        )
    }

    #[test]
    fn an_untrusted_peer_cannot_claim_another_address() {
        assert_eq!(xff("203.0.113.9", &["198.51.100.1"]), ip("203.0.113.9"));
        assert_eq!(fwd("203.0.113.9", &["for=198.51.100.1"]), ip("203.0.113.9"));
        // Not even by naming a trusted proxy as its own origin.
        assert_eq!(xff("203.0.113.9", &["10.0.0.1"]), ip("203.0.113.9"));
    }

    #[test]
    fn without_trusted_proxies_the_peer_is_the_client() {
        let h = headers(X_FORWARDED_FOR, &["198.51.100.1"]);
        let got = client_ip(peer("10.0.0.1"), &h, &[], ForwardedHeader::XForwardedFor);
        assert_eq!(got, ip("10.0.0.1"));
    }

    #[test]
    fn behind_a_trusted_proxy_the_right_most_untrusted_hop_is_the_client() {
        assert_eq!(xff("10.0.0.2", &["203.0.113.9"]), ip("203.0.113.9"));
        // Two proxies of ours: skip both.
        assert_eq!(
            xff("10.0.0.2", &["203.0.113.9, 10.0.0.1"]),
            ip("203.0.113.9")
        );
        // The client sent its own header; the proxy appended the real address after it.
        assert_eq!(
            xff("10.0.0.2", &["1.1.1.1, 8.8.8.8, 203.0.113.9"]),
            ip("203.0.113.9")
        );
        // Spoofed entries that name trusted proxies do not help either.
        assert_eq!(
            xff("10.0.0.2", &["10.9.9.9, 203.0.113.9, 10.0.0.1"]),
            ip("203.0.113.9")
        );
        // One header line per hop is the same list.
        assert_eq!(
            xff("10.0.0.2", &["1.1.1.1", "203.0.113.9", "10.0.0.1"]),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn a_request_from_inside_is_attributed_to_its_origin() {
        assert_eq!(xff("10.0.0.2", &["10.0.0.7, 10.0.0.1"]), ip("10.0.0.7"));
        // The proxy itself (health checks) sends no header.
        assert_eq!(xff("10.0.0.2", &[]), ip("10.0.0.2"));
    }

    #[test]
    fn malformed_headers_fall_back_to_the_peer() {
        assert_eq!(xff("10.0.0.2", &["not-an-ip"]), ip("10.0.0.2"));
        assert_eq!(xff("10.0.0.2", &["203.0.113.9,"]), ip("10.0.0.2"));
        assert_eq!(xff("10.0.0.2", &["203.0.113.9, unknown"]), ip("10.0.0.2"));
        assert_eq!(xff("10.0.0.2", &["203.0.113.9:99999"]), ip("10.0.0.2"));
        let mut h = HeaderMap::new();
        h.append(
            X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"203.0.113.9\xff").expect("opaque bytes are allowed"),
        );
        let got = client_ip(
            peer("10.0.0.2"),
            &h,
            &proxies(),
            ForwardedHeader::XForwardedFor,
        );
        assert_eq!(got, ip("10.0.0.2"));
        // A malformed entry further left than the client does not matter.
        assert_eq!(
            xff("10.0.0.2", &["garbage, 203.0.113.9"]),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn x_forwarded_for_entries_may_carry_ports_and_brackets() {
        assert_eq!(xff("10.0.0.2", &["203.0.113.9:5555"]), ip("203.0.113.9"));
        assert_eq!(xff("10.0.0.2", &["2001:db8::7"]), ip("2001:db8::7"));
        assert_eq!(xff("10.0.0.2", &["[2001:db8::7]:443"]), ip("2001:db8::7"));
    }

    #[test]
    fn forwarded_handles_quoted_ipv6_ports_and_parameters() {
        assert_eq!(
            fwd("10.0.0.2", &[r#"for="[2001:db8:cafe::17]:4711""#]),
            ip("2001:db8:cafe::17")
        );
        assert_eq!(
            fwd(
                "10.0.0.2",
                &["for=192.0.2.60;proto=http;by=203.0.113.43, For=10.0.0.1"]
            ),
            ip("192.0.2.60")
        );
        assert_eq!(
            fwd("10.0.0.2", &[r#"proto=https;for="203.0.113.9:80""#]),
            ip("203.0.113.9")
        );
        // Commas and semicolons inside quoted values do not split elements.
        assert_eq!(
            fwd(
                "10.0.0.2",
                &[r#"for=198.51.100.1;ext="a,b;c", for=203.0.113.9;ext="x\"y,z""#]
            ),
            ip("203.0.113.9")
        );
        // The trusted proxy's own element is skipped (an IPv6 proxy this time).
        assert_eq!(
            fwd(
                "2001:db8:ffff::1",
                &[r#"for=203.0.113.9, for="[2001:db8:ffff::2]""#]
            ),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn forwarded_without_a_usable_for_falls_back_to_the_peer() {
        assert_eq!(fwd("10.0.0.2", &["for=unknown"]), ip("10.0.0.2"));
        assert_eq!(fwd("10.0.0.2", &["for=_hidden"]), ip("10.0.0.2"));
        assert_eq!(fwd("10.0.0.2", &["proto=https"]), ip("10.0.0.2"));
        assert_eq!(fwd("10.0.0.2", &[r#"for="[2001:db8::1"#]), ip("10.0.0.2"));
        assert_eq!(fwd("10.0.0.2", &[r#"for="203.0.113.9"#]), ip("10.0.0.2"));
        // An obfuscated port is still a valid node.
        assert_eq!(
            fwd("10.0.0.2", &[r#"for="192.0.2.43:_p1""#]),
            ip("192.0.2.43")
        );
    }

    #[test]
    fn only_the_configured_header_is_read() {
        // The proxy appends to X-Forwarded-For and passes the client's Forwarded through.
        let mut h = headers(X_FORWARDED_FOR, &["203.0.113.9"]);
        h.append(FORWARDED, HeaderValue::from_static("for=198.51.100.1"));
        let via_xff = client_ip(
            peer("10.0.0.2"),
            &h,
            &proxies(),
            ForwardedHeader::XForwardedFor,
        );
        assert_eq!(via_xff, ip("203.0.113.9"));
        let via_fwd = client_ip(peer("10.0.0.2"), &h, &proxies(), ForwardedHeader::Forwarded);
        assert_eq!(via_fwd, ip("198.51.100.1"));
    }

    #[test]
    fn ipv4_mapped_addresses_are_ipv4() {
        assert_eq!(xff("::ffff:10.0.0.2", &["203.0.113.9"]), ip("203.0.113.9"));
        assert_eq!(xff("::ffff:203.0.113.9", &[]), ip("203.0.113.9"));
        assert_eq!(xff("10.0.0.2", &["::ffff:203.0.113.9"]), ip("203.0.113.9"));
    }

    #[test]
    fn clients_are_keyed_by_ipv4_address_or_ipv6_64() {
        let key = |s: &str| ClientKey::from(ip(s));
        assert_eq!(key("192.0.2.1"), ClientKey::V4(0xC000_0201));
        assert_eq!(key("::ffff:192.0.2.1"), key("192.0.2.1"));
        assert_ne!(key("192.0.2.1"), key("192.0.2.2"));
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_ne!(key("0.0.0.1"), key("0:0:0:1::"));
    }
}

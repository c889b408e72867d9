//! Generated gRPC types and services for the coordinator protocol.
//!
//! This crate owns code generation from `proto/` and how a coordinator address is written
//! ([`coordinator_url`]), nothing else. Generated types stay at the
//! edge: handlers in other crates convert them into domain types.

#![allow(clippy::all, missing_docs)]

/// `mentor.coordinator.v1`: the worker-facing and user-facing services.
pub mod coordinator {
    pub mod v1 {
        tonic::include_proto!("mentor.coordinator.v1");
    }
}

/// Reads a coordinator address the way users write it and returns the URL to connect to.
///
/// Accepts `HOST:PORT` (the form the coordinator's `--listen` takes; `http://` is added) and
/// `http://HOST:PORT` (the form it writes to `<state-dir>/coordinator.addr`). Refuses, saying
/// why, anything else: another scheme (this build speaks plain HTTP/2, without TLS), an
/// address without a host or a port (`node-3` alone would mean port 80, never the
/// coordinator's), or one with a path.
pub fn coordinator_url(address: &str) -> Result<String, String> {
    let address = address.trim();
    if address.is_empty() {
        return Err("empty address: expected HOST:PORT or http://HOST:PORT".to_string());
    }
    let url = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    let uri: tonic::transport::Uri = url
        .parse()
        .map_err(|error| format!("{error}: expected HOST:PORT or http://HOST:PORT"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(format!(
                "scheme `{other}` is not supported: the coordinator speaks plain HTTP/2 (http://HOST:PORT)"
            ))
        }
        None => return Err("expected HOST:PORT or http://HOST:PORT".to_string()),
    }
    match uri.authority() {
        Some(authority) if authority.host().is_empty() => {
            return Err("no host: expected HOST:PORT or http://HOST:PORT".to_string())
        }
        Some(authority) if authority.port_u16().is_none() => {
            return Err(format!(
                "no port in `{address}`: expected HOST:PORT or http://HOST:PORT"
            ))
        }
        Some(_) => {}
        None => return Err("no host: expected HOST:PORT or http://HOST:PORT".to_string()),
    }
    if !matches!(uri.path(), "" | "/") {
        return Err(format!(
            "unexpected path `{}`: expected HOST:PORT or http://HOST:PORT",
            uri.path()
        ));
    }
    Ok(url)
}

/// Whether `host` (an IP address, `[IPv6]`, or a name) is the loopback host: a ring address or
/// coordinator there is reached from its own machine alone.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The host of `HOST:PORT` or `http://HOST:PORT` (`[::1]` for an IPv6 address).
pub fn host_of(address: &str) -> &str {
    let authority = address
        .split_once("://")
        .map_or(address, |(_, rest)| rest)
        .trim_end_matches('/');
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
}

#[cfg(test)]
mod tests {
    use super::{coordinator_url, host_of, is_loopback_host};

    #[test]
    fn loopback_hosts_are_told_from_others() {
        for (address, host, loopback) in [
            ("127.0.0.1:9000", "127.0.0.1", true),
            ("http://localhost:50051", "localhost", true),
            ("[::1]:9000", "[::1]", true),
            ("http://10.0.0.7:50051/", "10.0.0.7", false),
            ("node-3:9000", "node-3", false),
        ] {
            assert_eq!(host_of(address), host, "{address}");
            assert_eq!(is_loopback_host(host_of(address)), loopback, "{address}");
        }
        assert!(is_loopback_host("127.0.0.2"));
        assert!(!is_loopback_host("0.0.0.0"));
    }

    #[test]
    fn a_coordinator_address_is_read_with_or_without_its_scheme() {
        for (address, url) in [
            ("127.0.0.1:50051", "http://127.0.0.1:50051"),
            (" node-3:7000 ", "http://node-3:7000"),
            ("[::1]:50051", "http://[::1]:50051"),
            ("http://127.0.0.1:50051", "http://127.0.0.1:50051"),
        ] {
            assert_eq!(
                coordinator_url(address).expect("accepted"),
                url,
                "{address:?}"
            );
        }
    }

    #[test]
    fn a_malformed_coordinator_address_is_refused_saying_why() {
        for (address, reason) in [
            ("", "empty address"),
            ("https://node-3:7000", "scheme `https` is not supported"),
            ("grpc://node-3:7000", "scheme `grpc` is not supported"),
            ("http://", "HOST:PORT"),
            ("node-3", "no port in `node-3`"),
            ("50051", "no port in `50051`"),
            ("http://node-3", "no port in `http://node-3`"),
            ("http://node-3:7000/status", "unexpected path `/status`"),
            ("node 3:7000", "HOST:PORT"),
        ] {
            let error = coordinator_url(address).expect_err("refused");
            assert!(error.contains(reason), "{address:?}: {error}");
        }
    }
}

//! The cross-site request guard of the management API (CSRF).
//!
//! The API has no authentication yet, so any page open in the operator's browser could POST
//! `cluster/join` or `cluster/leave` to `127.0.0.1:18083`. Browsers mark such requests: they send
//! `Origin` (the page's origin) with every cross-origin POST, and `Sec-Fetch-Site` with its
//! verdict. A state-changing request (anything but GET, HEAD, OPTIONS) is refused when either
//! says it comes from another origin; `shardmq ctl`, curl and scripts send neither and pass.
//! Reads stay open: a browser does not let a foreign page read the answer (no CORS headers).
//!
//! Pure functions over header values, so the rule is tested without a socket.

/// Whether `method` may change the node's state (and so must pass [`refusal`]).
pub fn is_state_changing(method: &str) -> bool {
    !matches!(method, "GET" | "HEAD" | "OPTIONS")
}

/// Why a state-changing request is refused, or `None` if it may go on.
///
/// `origin`, `host` and `fetch_site` are the raw values of the `Origin`, `Host` and
/// `Sec-Fetch-Site` headers (absent: `None`; a value that is not text is passed as `Some("")`,
/// which is refused).
pub fn refusal(
    origin: Option<&str>,
    host: Option<&str>,
    fetch_site: Option<&str>,
) -> Option<&'static str> {
    // Fetch metadata: "none" is a user typing the URL, "same-origin" is the API's own page.
    // "same-site" is refused too: another port on localhost is the same site.
    if let Some(site) = fetch_site {
        if !site.eq_ignore_ascii_case("same-origin") && !site.eq_ignore_ascii_case("none") {
            return Some("cross-site request refused (Sec-Fetch-Site)");
        }
    }
    let origin = origin?;
    let Some(from) = origin_authority(origin) else {
        return Some("request from an opaque or malformed Origin refused");
    };
    let Some(to) = host.and_then(|h| authority(h, from.2)) else {
        return Some("request with an Origin but no valid Host refused");
    };
    if (from.0.as_str(), from.1) != (to.0.as_str(), to.1) {
        return Some("cross-origin request refused (Origin does not match Host)");
    }
    None
}

/// `(host, port, default port)` of an `Origin` value `scheme://host[:port]`; `None` for
/// `null`, a path, an unknown scheme or a bad port.
fn origin_authority(origin: &str) -> Option<(String, u16, u16)> {
    let (scheme, rest) = origin.trim().split_once("://")?;
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    if rest.contains(['/', '?', '#', '@']) {
        return None;
    }
    let (host, port) = authority(rest, default_port)?;
    Some((host, port, default_port))
}

/// `(lower-case host, port)` of `host[:port]` or `[v6]:port`; `default_port` when absent.
fn authority(value: &str, default_port: u16) -> Option<(String, u16)> {
    let value = value.trim();
    let (host, port) = if let Some(v6) = value.strip_prefix('[') {
        let (inner, after) = v6.split_once(']')?;
        let port = match after {
            "" => default_port,
            p => p.strip_prefix(':')?.parse().ok()?,
        };
        (format!("[{inner}]"), port)
    } else {
        match value.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().ok()?),
            None => (value.to_string(), default_port),
        }
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return None;
    }
    Some((host.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_request_without_origin_or_fetch_metadata_passes() {
        assert_eq!(refusal(None, Some("127.0.0.1:18083"), None), None);
        assert_eq!(refusal(None, None, None), None);
    }

    #[test]
    fn an_origin_equal_to_host_passes() {
        let host = Some("127.0.0.1:18083");
        assert_eq!(refusal(Some("http://127.0.0.1:18083"), host, None), None);
        assert_eq!(
            refusal(Some("HTTP://LocalHost:80"), Some("localhost"), None),
            None
        );
        assert_eq!(
            refusal(Some("http://[::1]:18083"), Some("[::1]:18083"), None),
            None
        );
        assert_eq!(refusal(None, host, Some("same-origin")), None);
        assert_eq!(refusal(None, host, Some("none")), None);
    }

    #[test]
    fn a_foreign_origin_is_refused() {
        let host = Some("127.0.0.1:18083");
        for origin in [
            "http://evil.example",
            "http://127.0.0.1:8080",
            "http://localhost:18083",
            "null",
            "",
            "http://127.0.0.1:18083/path",
            "http://user@127.0.0.1:18083",
            "file://",
        ] {
            assert!(refusal(Some(origin), host, None).is_some(), "{origin:?}");
        }
        assert!(refusal(Some("http://127.0.0.1:18083"), None, None).is_some());
        assert!(refusal(None, host, Some("cross-site")).is_some());
        assert!(refusal(None, host, Some("same-site")).is_some());
    }

    #[test]
    fn only_reads_skip_the_guard() {
        assert!(!is_state_changing("GET"));
        assert!(!is_state_changing("HEAD"));
        for m in ["POST", "PUT", "DELETE", "PATCH", "BREW"] {
            assert!(is_state_changing(m));
        }
    }

    proptest! {
        /// Any bytes in the three headers: no panic, and an origin is let through only when
        /// it names exactly the host the request was sent to.
        #[test]
        fn refusal_never_panics_and_passes_only_matching_origins(
            origin in proptest::option::of(".{0,64}"),
            host in proptest::option::of(".{0,64}"),
            site in proptest::option::of(".{0,16}"),
        ) {
            let verdict = refusal(origin.as_deref(), host.as_deref(), site.as_deref());
            if verdict.is_none() {
                if let Some(o) = &origin {
                    let (oh, op, d) = origin_authority(o).expect("passed origin parses");
                    let (hh, hp) = authority(host.as_deref().expect("host present"), d)
                        .expect("passed host parses");
                    prop_assert_eq!((oh, op), (hh, hp));
                }
            }
        }

        /// A same-origin request built from any host and port passes.
        #[test]
        fn same_origin_passes_for_any_host(h in "[a-z0-9.-]{1,30}", port in 1u16..) {
            let host = format!("{h}:{port}");
            let origin = format!("http://{host}");
            prop_assert_eq!(refusal(Some(&origin), Some(&host), None), None);
        }
    }
}

//! Where a captured connection's requests go, decided from what they say: pure, no I/O
//! (fuzzed: `fuzz/src/lib.rs`'s `http_sniff` and `http_headers`).
//!
//! [`sniff`] tells an HTTP/1.x request line and the HTTP/2 preface from anything else in
//! a connection's first bytes; [`Routes`] holds a captured pod port's intercepts (at most
//! one global, any number of personal ones with their [`Matchers`], most specific first)
//! and [`Routes::choose`]s a request's [`Dest`]; [`decline_h2c`] and [`for_next_hop`]
//! ready a request's headers for the hop past the agent.

use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, EXPECT, HOST, TE, UPGRADE};
use tpvpn_tunnel::Matchers;

/// The HTTP/2 connection preface.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The longest method name taken for HTTP.
const METHOD_MAX: usize = 20;

/// What the first bytes of a connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// Too few bytes to tell.
    NeedMore,
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 preface (prior knowledge, as h2c and gRPC clients send it).
    Http2,
    /// Anything else (a TLS handshake, another protocol).
    Other,
}

/// Longest first line taken for an HTTP/1 request line (nginx's default limit); a
/// connection whose first line is longer passes whole.
pub const REQUEST_LINE_MAX: usize = 8 * 1024;

/// Classifies the first bytes of a connection. Only tells the protocol apart: hyper
/// parses. Once it is not [`Sniff::NeedMore`], more bytes never change the answer. HTTP/1
/// is a whole first line `METHOD TARGET HTTP/1.x` (within [`REQUEST_LINE_MAX`]): other
/// client-first text that starts like one (a PROXY protocol preamble, `SET key value`)
/// is not, and passes whole.
pub fn sniff(b: &[u8]) -> Sniff {
    if b.is_empty() {
        return Sniff::NeedMore;
    }
    let n = b.len().min(H2_PREFACE.len());
    if b[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() { Sniff::Http2 } else { Sniff::NeedMore };
    }
    // A method (an upper-case token), one space, and a request target.
    for (i, &c) in b.iter().enumerate().take(METHOD_MAX + 1) {
        if c == b' ' {
            return match (i, b.get(i + 1)) {
                (0, _) => Sniff::Other,
                (_, None) => Sniff::NeedMore,
                (_, Some(t)) if *t == b'/' || *t == b'*' || t.is_ascii_alphanumeric() => request_line(b),
                _ => Sniff::Other,
            };
        }
        if !(c.is_ascii_uppercase() || c == b'-' || c == b'_') {
            return Sniff::Other;
        }
    }
    if b.len() > METHOD_MAX {
        Sniff::Other
    } else {
        Sniff::NeedMore
    }
}

/// Whether the first line of `b` (which starts like a request line) ends as one.
fn request_line(b: &[u8]) -> Sniff {
    let head = &b[..b.len().min(REQUEST_LINE_MAX + 1)];
    match head.iter().position(|&c| c == b'\n') {
        Some(end) => {
            let line = head[..end].strip_suffix(b"\r").unwrap_or(&head[..end]);
            if line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0") {
                Sniff::Http1
            } else {
                Sniff::Other
            }
        }
        None if b.len() > REQUEST_LINE_MAX => Sniff::Other,
        None => Sniff::NeedMore,
    }
}

/// One intercept of a pod port, as the agent routes to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The manager's capture id (what `InterceptOpen` names).
    pub id: u64,
    pub matchers: Matchers,
}

/// Whether a request with `headers` and `path` matches: every header has a value equal
/// to the matcher's (names are case-insensitive), and the path starts with the prefix.
pub fn matches(m: &Matchers, headers: &HeaderMap, path: &str) -> bool {
    m.headers
        .iter()
        .all(|(name, value)| headers.get_all(name.as_str()).iter().any(|v| v.as_bytes() == value.as_bytes()))
        && path.starts_with(&m.path_prefix)
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dest {
    /// The pod's own server.
    Pod,
    /// The laptop of capture `id`.
    Laptop(u64),
}

impl std::fmt::Display for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dest::Pod => f.write_str("the pod"),
            Dest::Laptop(id) => write!(f, "the laptop of capture {id}"),
        }
    }
}

/// A request's destination: the first personal route that matches (routes are kept most
/// specific first), else the global one, else the pod.
pub fn choose(routes: &[Route], headers: &HeaderMap, path: &str) -> Dest {
    routes
        .iter()
        .find(|r| !r.matchers.is_empty() && matches(&r.matchers, headers, path))
        .or_else(|| routes.iter().find(|r| r.matchers.is_empty()))
        .map_or(Dest::Pod, |r| Dest::Laptop(r.id))
}

/// The `Vary` value for an answer from `dest`: the header names of the personal route
/// that chose it (none for the pod or the global route).
fn vary_of(routes: &[Route], dest: Dest) -> Option<HeaderValue> {
    let Dest::Laptop(id) = dest else { return None };
    let route = routes.iter().find(|r| r.id == id && !r.matchers.is_empty())?;
    let names: Vec<&str> = route.matchers.headers.iter().map(|(k, _)| k.as_str()).collect();
    HeaderValue::from_str(&names.join(", ")).ok().filter(|_| !names.is_empty())
}

/// A captured pod port's routes, most specific first.
#[derive(Debug, Default)]
pub struct Routes(Vec<Route>);

impl Routes {
    /// Adds (or replaces) route `id`; routes with more matchers come first.
    pub fn set(&mut self, route: Route) {
        self.0.retain(|r| r.id != route.id);
        self.0.push(route);
        self.0.sort_by_key(|r| {
            std::cmp::Reverse(r.matchers.headers.len() + usize::from(!r.matchers.path_prefix.is_empty()))
        });
    }

    /// Removes route `id`; whether any is left.
    pub fn remove(&mut self, id: u64) -> bool {
        self.0.retain(|r| r.id != id);
        !self.0.is_empty()
    }

    /// Removes every route: what is still asked goes to the pod.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// The global route's capture id.
    pub fn global(&self) -> Option<u64> {
        self.0.iter().find(|r| r.matchers.is_empty()).map(|r| r.id)
    }

    /// Whether any personal route is in place.
    pub fn has_personal(&self) -> bool {
        self.0.iter().any(|r| !r.matchers.is_empty())
    }

    /// A request's destination ([`choose`]), and the `Vary` value of its answer.
    pub fn choose(&self, headers: &HeaderMap, path: &str) -> (Dest, Option<HeaderValue>) {
        let dest = choose(&self.0, headers, path);
        (dest, vary_of(&self.0, dest))
    }
}

/// Declines an HTTP/1.1 request's offer to upgrade to HTTP/2 (`Upgrade: h2c`, with its
/// `HTTP2-Settings` and their `Connection` tokens): whichever server accepted it would
/// get the connection whole, every later request on it past the routing. The request
/// goes on as HTTP/1.1, as RFC 9110 lets any intermediary do (and Envoy does); other
/// upgrades (WebSocket) stay.
pub fn decline_h2c(headers: &mut HeaderMap) {
    let tokens = |h: &HeaderMap, name| -> Vec<String> {
        let values = h.get_all(name).iter().filter_map(|v| v.to_str().ok());
        values.flat_map(|v| v.split(',')).map(str::trim).filter(|t| !t.is_empty()).map(str::to_string).collect()
    };
    let without = |tokens: Vec<String>, gone: &[&str]| -> Vec<String> {
        tokens.into_iter().filter(|t| !gone.iter().any(|g| t.eq_ignore_ascii_case(g))).collect()
    };
    let put = |h: &mut HeaderMap, name, tokens: Vec<String>| {
        h.remove(&name);
        if let Ok(v) = HeaderValue::from_str(&tokens.join(", ")) {
            if !tokens.is_empty() {
                h.insert(name, v);
            }
        }
    };
    let offered = tokens(headers, UPGRADE);
    if !offered.iter().any(|t| t.eq_ignore_ascii_case("h2c")) {
        return;
    }
    let upgrades = without(offered, &["h2c"]);
    let mut gone = vec!["http2-settings"];
    if upgrades.is_empty() {
        gone.push("upgrade");
    }
    let connection = without(tokens(headers, CONNECTION), &gone);
    headers.remove("http2-settings");
    put(headers, UPGRADE, upgrades);
    put(headers, CONNECTION, connection);
}

/// Readies a request's headers for the hop from the agent to the app or a laptop, as an
/// intermediary does (RFC 9110 7.6.1; audit B-11): removes the headers `Connection`
/// names (never `Host`), `Connection` itself, `Keep-Alive`, `Proxy-Connection`, `Expect`
/// (hyper has answered `100 Continue` to the caller as it reads the body, which it sends
/// on whole), `TE` other than `trailers` (gRPC's), `Upgrade` unless the request
/// `upgrade`s (then `Connection: upgrade` is all that is left of `Connection`), and
/// every header whose name has an `_` (servers that read it as `-` would see a second
/// `Content-Length` or `Transfer-Encoding` no one else saw). The framing headers are
/// hyper's own: `Content-Length` is written anew from the body's length.
pub fn for_next_hop(headers: &mut HeaderMap, upgrade: bool) {
    let nominated: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| *n != HOST && !(upgrade && *n == UPGRADE))
        .collect();
    for name in nominated {
        headers.remove(name);
    }
    for name in [CONNECTION, EXPECT, HeaderName::from_static("keep-alive"), HeaderName::from_static("proxy-connection")]
    {
        headers.remove(name);
    }
    let trailers = headers
        .get_all(TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers")));
    headers.remove(TE);
    if trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    let underscored: Vec<HeaderName> = headers.keys().filter(|n| n.as_str().contains('_')).cloned().collect();
    for name in underscored {
        headers.remove(name);
    }
    if upgrade && headers.contains_key(UPGRADE) {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(UPGRADE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_h2c_upgrade_offer_is_declined_and_nothing_else() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, HeaderValue::from_static(v));
            }
            h
        };
        let mut h = headers(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
            ("x-dev", "a"),
        ]);
        decline_h2c(&mut h);
        assert_eq!(h, headers(&[("x-dev", "a")]));
        // Another upgrade offered beside it stays, and the connection's other tokens.
        let mut h = headers(&[
            ("connection", "keep-alive, upgrade"),
            ("connection", "HTTP2-Settings"),
            ("upgrade", "H2C, websocket"),
            ("http2-settings", "AAMAAABk"),
        ]);
        decline_h2c(&mut h);
        assert_eq!(h, headers(&[("connection", "keep-alive, upgrade"), ("upgrade", "websocket")]));
        let ws = headers(&[("connection", "Upgrade"), ("upgrade", "websocket"), ("sec-websocket-version", "13")]);
        let mut h = ws.clone();
        decline_h2c(&mut h);
        assert_eq!(h, ws, "a WebSocket upgrade is left alone");
    }

    #[test]
    fn what_was_for_the_hop_to_the_agent_stops_there() {
        let mut h = headers(&[
            ("host", "web"),
            ("connection", "keep-alive, X-Nominated, Host"),
            ("x-nominated", "secret"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("expect", "100-continue"),
            ("content_length", "5"),
            ("te", "trailers, gzip"),
            ("upgrade", "websocket"),
            ("x-dev", "a"),
        ]);
        for_next_hop(&mut h, false);
        assert_eq!(h, headers(&[("host", "web"), ("te", "trailers"), ("x-dev", "a")]));
        // A WebSocket upgrade keeps its `Upgrade`, and `Connection: upgrade` alone.
        let mut h = headers(&[("connection", "Upgrade, keep-alive"), ("upgrade", "websocket"), ("te", "gzip")]);
        for_next_hop(&mut h, true);
        assert_eq!(h, headers(&[("upgrade", "websocket"), ("connection", "upgrade")]));
    }

    #[test]
    fn sniffing_tells_http_from_the_rest() {
        assert_eq!(sniff(b""), Sniff::NeedMore);
        assert_eq!(sniff(b"GE"), Sniff::NeedMore);
        assert_eq!(sniff(b"GET "), Sniff::NeedMore);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniff::Http1);
        assert_eq!(sniff(b"OPTIONS * HTTP/1.1\r\n"), Sniff::Http1);
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n"), Sniff::NeedMore);
        assert_eq!(sniff(H2_PREFACE), Sniff::Http2);
        assert_eq!(sniff(b"\x16\x03\x01\x02\x00\x01"), Sniff::Other, "a TLS ClientHello");
        assert_eq!(sniff(b"*1\r\n$4\r\nPING\r\n"), Sniff::Other, "redis");
        assert_eq!(sniff(b"get / HTTP/1.1"), Sniff::Other);
        assert_eq!(sniff(&[b'A'; 40]), Sniff::Other);
        // Audit B-16: client-first text protocols shaped like a request line are not HTTP
        // (hyper would answer them 400): a PROXY protocol preamble (ingress controllers
        // behind a load balancer), a command of a text protocol.
        let proxy = b"PROXY TCP4 192.0.2.1 10.244.2.10 5555 8080\r\nGET / HTTP/1.1\r\nHost: web\r\n\r\n";
        assert_eq!(sniff(proxy), Sniff::Other);
        assert_eq!(sniff(b"PROXY TCP4 192.0.2.1 10.244.2.10 5555"), Sniff::NeedMore, "until the line ends");
        assert_eq!(sniff(b"\r\n\r\n\0\r\nQUIT\n\x21\x11"), Sniff::Other, "PROXY protocol v2");
        assert_eq!(sniff(b"SET key value\r\n"), Sniff::Other);
        assert_eq!(sniff(b"GET /a HTTP/1.0\n"), Sniff::Http1, "a bare LF ends a line too");
        assert_eq!(sniff(b"GET /a HTTP/1.1 \r\n"), Sniff::Other);
        let mut long = b"GET /".to_vec();
        long.resize(REQUEST_LINE_MAX + 1, b'a');
        assert_eq!(sniff(&long), Sniff::Other, "a request line past the bound passes whole");
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn a_ports_routes_keep_the_most_specific_first_and_say_what_holds_the_port() {
        let m = |h: &[(&str, &str)], p: &str| Matchers {
            headers: h.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            path_prefix: p.into(),
        };
        let mut routes = Routes::default();
        assert_eq!((routes.global(), routes.has_personal()), (None, false));
        routes.set(Route { id: 1, matchers: Matchers::default() });
        routes.set(Route { id: 2, matchers: m(&[("x-dev", "a")], "") });
        routes.set(Route { id: 3, matchers: m(&[("x-dev", "a")], "/api") });
        assert_eq!((routes.global(), routes.has_personal()), (Some(1), true));
        let h = headers(&[("x-dev", "a")]);
        assert_eq!(routes.choose(&h, "/api/x").0, Dest::Laptop(3), "the longer match first, whatever the order set");
        assert_eq!(routes.choose(&h, "/web"), (Dest::Laptop(2), Some(HeaderValue::from_static("x-dev"))));
        assert_eq!(routes.choose(&headers(&[]), "/"), (Dest::Laptop(1), None), "no Vary on the global route's answers");
        // Set again: replaced, not added.
        routes.set(Route { id: 3, matchers: m(&[("x-dev", "b")], "/api") });
        assert_eq!(routes.choose(&h, "/api/x").0, Dest::Laptop(2));
        assert!(routes.remove(1) && routes.remove(2));
        assert_eq!(routes.global(), None);
        assert!(!routes.remove(3), "none left");
        routes.set(Route { id: 4, matchers: Matchers::default() });
        routes.clear();
        assert_eq!(routes.choose(&h, "/").0, Dest::Pod);
    }

    #[test]
    fn requests_go_to_the_most_specific_match_then_the_global_then_the_pod() {
        let m = |h: &[(&str, &str)], p: &str| Matchers {
            headers: h.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            path_prefix: p.into(),
        };
        let mut routes = vec![
            Route { id: 1, matchers: m(&[("x-dev", "a")], "") },
            Route { id: 2, matchers: m(&[("x-dev", "b")], "") },
        ];
        assert_eq!(choose(&routes, &headers(&[("X-Dev", "a")]), "/"), Dest::Laptop(1));
        assert_eq!(choose(&routes, &headers(&[("x-dev", "b")]), "/x"), Dest::Laptop(2));
        assert_eq!(choose(&routes, &headers(&[("x-dev", "c")]), "/"), Dest::Pod);
        assert_eq!(choose(&routes, &headers(&[("x-dev", "A")]), "/"), Dest::Pod, "values are exact");
        assert_eq!(
            choose(&routes, &headers(&[("x-dev", "c"), ("x-dev", "b")]), "/"),
            Dest::Laptop(2),
            "any value of a repeated header"
        );
        routes.push(Route { id: 3, matchers: Matchers::default() });
        assert_eq!(choose(&routes, &headers(&[]), "/"), Dest::Laptop(3));
        routes.insert(0, Route { id: 4, matchers: m(&[("x-dev", "a")], "/api") });
        assert_eq!(choose(&routes, &headers(&[("x-dev", "a")]), "/api/v1"), Dest::Laptop(4));
        assert_eq!(choose(&routes, &headers(&[("x-dev", "a")]), "/ap"), Dest::Laptop(1));
    }
}

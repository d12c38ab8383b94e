//! Health and Prometheus metrics of the manager, served over HTTP:
//! `/healthz` (the process serves), `/readyz` (the QUIC endpoint is up and, with
//! Kubernetes, the first cluster view is known) and `/metrics` (text exposition format).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tracing::debug;

/// Counters and gauges; all relaxed atomics (they are statistics, not synchronisation).
#[derive(Debug, Default)]
pub struct Metrics {
    pub ready: AtomicBool,
    pub sessions: AtomicU64,
    pub sessions_total: AtomicU64,
    pub refused_total: AtomicU64,
    pub tcp_flows: AtomicU64,
    pub tcp_flows_total: AtomicU64,
    pub udp_flows: AtomicU64,
    pub udp_flows_total: AtomicU64,
    pub dial_failures_refused: AtomicU64,
    pub dial_failures_unreachable: AtomicU64,
    pub dial_failures_timeout: AtomicU64,
    pub bytes_to_cluster: AtomicU64,
    pub bytes_from_cluster: AtomicU64,
    /// Flows not dialed: the destination policy, a per-client limit.
    pub flows_denied_policy: AtomicU64,
    pub flows_denied_limit: AtomicU64,
}

/// Increments a gauge for as long as it lives.
pub struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    pub fn new(gauge: &'a AtomicU64, total: &AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        total.fetch_add(1, Ordering::Relaxed);
        Gauge(gauge)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub fn add(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (labels, v) in samples {
                out.push_str(&format!("{name}{labels} {v}\n"));
            }
        };
        metric("tpvpn_manager_sessions", "gauge", "Connected clients.", &[("", get(&self.sessions))]);
        metric("tpvpn_manager_sessions_total", "counter", "Clients authenticated.", &[("", get(&self.sessions_total))]);
        metric(
            "tpvpn_manager_refused_total",
            "counter",
            "Clients refused (token, version).",
            &[("", get(&self.refused_total))],
        );
        metric(
            "tpvpn_manager_flows",
            "gauge",
            "Open flows.",
            &[("{proto=\"tcp\"}", get(&self.tcp_flows)), ("{proto=\"udp\"}", get(&self.udp_flows))],
        );
        metric(
            "tpvpn_manager_flows_total",
            "counter",
            "Flows opened.",
            &[("{proto=\"tcp\"}", get(&self.tcp_flows_total)), ("{proto=\"udp\"}", get(&self.udp_flows_total))],
        );
        metric(
            "tpvpn_manager_dial_failures_total",
            "counter",
            "TCP dials that failed.",
            &[
                ("{reason=\"refused\"}", get(&self.dial_failures_refused)),
                ("{reason=\"unreachable\"}", get(&self.dial_failures_unreachable)),
                ("{reason=\"timeout\"}", get(&self.dial_failures_timeout)),
            ],
        );
        metric(
            "tpvpn_manager_flows_denied_total",
            "counter",
            "Flows not dialed.",
            &[
                ("{reason=\"policy\"}", get(&self.flows_denied_policy)),
                ("{reason=\"limit\"}", get(&self.flows_denied_limit)),
            ],
        );
        metric(
            "tpvpn_manager_bytes_total",
            "counter",
            "Payload bytes relayed.",
            &[
                ("{direction=\"to_cluster\"}", get(&self.bytes_to_cluster)),
                ("{direction=\"from_cluster\"}", get(&self.bytes_from_cluster)),
            ],
        );
        out
    }

    fn respond(&self, path: &str) -> Response<Full<Bytes>> {
        let (status, body) = match path {
            "/healthz" => (StatusCode::OK, "ok\n".to_string()),
            "/readyz" if self.ready.load(Ordering::Relaxed) => (StatusCode::OK, "ready\n".to_string()),
            "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_string()),
            "/metrics" => (StatusCode::OK, self.render()),
            _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
        };
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if path == "/metrics" {
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
        }
        r
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let r = metrics.respond(req.uri().path());
                async move { Ok::<_, Infallible>(r) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                debug!(error = %e, "metrics connection");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_follow_guards_and_render_parses() {
        let m = Metrics::default();
        {
            let _g = Gauge::new(&m.tcp_flows, &m.tcp_flows_total);
            assert!(m.render().contains("tpvpn_manager_flows{proto=\"tcp\"} 1\n"));
        }
        let text = m.render();
        assert!(text.contains("tpvpn_manager_flows{proto=\"tcp\"} 0\n"));
        assert!(text.contains("tpvpn_manager_flows_total{proto=\"tcp\"} 1\n"));
        // Every sample line is `name{labels} value` with a numeric value.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = line.rsplit_once(' ').unwrap();
            assert!(v.parse::<u64>().is_ok(), "{line}");
        }
        assert_eq!(m.respond("/readyz").status(), StatusCode::SERVICE_UNAVAILABLE);
        m.ready.store(true, Ordering::Relaxed);
        assert_eq!(m.respond("/readyz").status(), StatusCode::OK);
        assert_eq!(m.respond("/nope").status(), StatusCode::NOT_FOUND);
    }
}

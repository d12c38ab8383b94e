//! The manager's view of the cluster, published on a `tokio::sync::watch` channel that
//! every session pushes to its client.
//!
//! Without Kubernetes it is what the flags say. With a Kubernetes client, reflectors
//! watch Services and Nodes (list + watch, re-listing after `410 Gone`, with backoff)
//! and the view is recomputed, debounced, after changes:
//! - service CIDR: the smallest CIDR covering every ClusterIP, widened to at least /16
//!   (IPv6: /112) so that new Services in the same range are covered too;
//! - pod CIDRs: the nodes' `podCIDRs`; when no node has them, the smallest CIDRs
//!   covering the (non-host-network) pod IPs, widened like the service CIDR (Pods are
//!   watched anyway: they are what intercepts capture);
//! - cluster DNS: the ClusterIP of `kube-system/kube-dns` (or `coredns`);
//! - flags add to all of it (`--cluster-cidr`) or override it (`--cluster-dns`).
//!
//! A second channel carries the [`Catalog`]: every namespace and Service, for clients'
//! DNS and `tpvpn list`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::Api;
use tokio::sync::{watch, Notify};
use tpvpn_tunnel::{ClusterInfo, Protocol, ServiceInfo, ServicePort};
use tracing::{info, warn};

use crate::catalog::Catalog;

/// Time to let a burst of watch events settle before recomputing.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// A learned CIDR is never wider than this (a /8): addresses that far apart are not one
/// cluster range, and routing them would take over the laptop's networking.
const WIDEST_LEARNED: u8 = 8;

/// The smallest CIDR of `ip`'s family that covers all of `ips`, no narrower than
/// `/16` (IPv4) or `/112` (IPv6); `None` (with a warning) if it would be wider than a /8.
fn covering(ips: &[IpAddr]) -> Option<IpNet> {
    let first = *ips.first()?;
    let mut net = IpNet::from(first);
    for ip in &ips[1..] {
        while !net.contains(ip) {
            net = net.supernet()?;
        }
    }
    if net.prefix_len() < WIDEST_LEARNED {
        warn!(cidr = %net, "addresses spread wider than a /{WIDEST_LEARNED}: not routed (give --cluster-cidr)");
        return None;
    }
    let widest = if first.is_ipv4() { 16 } else { 112 };
    if net.prefix_len() > widest {
        net = IpNet::new(net.addr(), widest).ok()?.trunc();
    }
    Some(net)
}

/// The catalog from the watched objects.
pub fn catalog(namespaces: &[Arc<Namespace>], services: &[Arc<Service>]) -> Catalog {
    let mut names: Vec<String> = namespaces.iter().filter_map(|n| n.metadata.name.clone()).collect();
    names.sort();
    let mut services: Vec<ServiceInfo> = services
        .iter()
        .filter_map(|s| {
            let spec = s.spec.as_ref()?;
            let cluster_ips = spec
                .cluster_ips
                .clone()
                .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
                .unwrap_or_default()
                .iter()
                .filter_map(|ip| ip.parse().ok())
                .collect();
            let ports = spec
                .ports
                .iter()
                .flatten()
                .filter_map(|p| {
                    Some(ServicePort {
                        name: p.name.clone().unwrap_or_default(),
                        protocol: match p.protocol.as_deref() {
                            Some("UDP") => Protocol::Udp,
                            Some("SCTP") => Protocol::Other(132),
                            _ => Protocol::Tcp,
                        },
                        port: u16::try_from(p.port).ok()?,
                    })
                })
                .collect();
            Some(ServiceInfo {
                namespace: s.metadata.namespace.clone()?,
                name: s.metadata.name.clone()?,
                cluster_ips,
                ports,
            })
        })
        .collect();
    services.sort();
    Catalog { namespaces: names, services }
}

/// The cluster view from the flags (`base`) and the watched objects. `pods` is empty
/// unless no node reports `podCIDRs`.
pub fn compute(base: &ClusterInfo, services: &[Arc<Service>], nodes: &[Arc<Node>], pods: &[Arc<Pod>]) -> ClusterInfo {
    let mut cidrs = base.cidrs.clone();
    let cluster_ips: Vec<IpAddr> = services
        .iter()
        .filter_map(|s| s.spec.as_ref())
        .flat_map(|spec| {
            spec.cluster_ips.clone().or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip])).unwrap_or_default()
        })
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = cluster_ips.iter().partition(|ip| ip.is_ipv4());
    cidrs.extend(covering(&v4));
    cidrs.extend(covering(&v6));
    for node in nodes {
        let Some(spec) = &node.spec else { continue };
        let pod_cidrs = spec.pod_cidrs.clone().or_else(|| spec.pod_cidr.clone().map(|c| vec![c])).unwrap_or_default();
        cidrs.extend(pod_cidrs.iter().filter_map(|c| c.parse::<IpNet>().ok()).map(|n| n.trunc()));
    }
    let pod_ips: Vec<IpAddr> = pods
        .iter()
        .filter(|p| !p.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false))
        .filter_map(|p| p.status.as_ref()?.pod_ips.clone())
        .flatten()
        .filter_map(|ip| ip.ip.parse().ok())
        .collect();
    let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = pod_ips.iter().partition(|ip| ip.is_ipv4());
    cidrs.extend(covering(&v4));
    cidrs.extend(covering(&v6));
    let dns = base.dns.or_else(|| {
        services
            .iter()
            .filter(|s| s.metadata.namespace.as_deref() == Some("kube-system"))
            .filter(|s| matches!(s.metadata.name.as_deref(), Some("kube-dns") | Some("coredns")))
            .filter_map(|s| s.spec.as_ref()?.cluster_ip.as_deref()?.parse().ok())
            .next()
    });
    ClusterInfo { cidrs: IpNet::aggregate(&cidrs), dns, domain: base.domain.clone() }
}

/// What the manager publishes: the routing view and the catalog, and (with
/// Kubernetes) the Services and Pods intercepts are resolved against.
#[derive(Clone)]
pub struct Views {
    pub cluster: watch::Receiver<ClusterInfo>,
    pub catalog: watch::Receiver<Arc<crate::catalog::Version>>,
    pub objects: Option<crate::intercepts::Objects>,
}

impl std::fmt::Debug for Views {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Views").field("cluster", &*self.cluster.borrow()).finish_non_exhaustive()
    }
}

/// Views that always hold `info` and an empty catalog (no Kubernetes).
pub fn fixed(info: ClusterInfo) -> Views {
    let empty = Arc::new(crate::catalog::Version::first(Arc::default()));
    Views { cluster: watch::channel(info).1, catalog: watch::channel(empty).1, objects: None }
}

/// Whether some node reports its pod CIDR (else pod CIDRs are learned from pod IPs).
fn nodes_have_pod_cidrs(nodes: &[Arc<Node>]) -> bool {
    nodes.iter().any(|n| {
        n.spec.as_ref().is_some_and(|s| s.pod_cidrs.as_ref().is_some_and(|c| !c.is_empty()) || s.pod_cidr.is_some())
    })
}

/// Publishes `value` if it differs from the current one; true if it did.
fn publish<T: PartialEq>(tx: &watch::Sender<T>, value: T) -> bool {
    tx.send_if_modified(|cur| {
        if *cur == value {
            return false;
        }
        *cur = value;
        true
    })
}

/// Watches the cluster through `client` and publishes the views; returns once the first
/// full view is known (or after `wait` if the API does not answer).
pub async fn watch(client: kube::Client, base: ClusterInfo, wait: Duration) -> Views {
    let (tx, rx) = watch::channel(base.clone());
    let mut current = Arc::new(crate::catalog::Version::first(Arc::default()));
    let (catalog_tx, catalog_rx) = watch::channel(current.clone());
    let (objects_tx, objects_rx) = watch::channel(0u64);
    let (svc_reader, svc_writer) = reflector::store::<Service>();
    let (node_reader, node_writer) = reflector::store::<Node>();
    let (ns_reader, ns_writer) = reflector::store::<Namespace>();
    let (pod_reader, pod_writer) = reflector::store::<Pod>();
    let changed = Arc::new(Notify::new());
    let config = watcher::Config::default;
    let services = reflector(svc_writer, watcher(Api::<Service>::all(client.clone()), config())).default_backoff();
    let nodes = reflector(node_writer, watcher(Api::<Node>::all(client.clone()), config())).default_backoff();
    let namespaces = reflector(ns_writer, watcher(Api::<Namespace>::all(client.clone()), config())).default_backoff();
    // Pods: the targets of intercepts, and the pod CIDRs when no node reports them.
    let pods = reflector(pod_writer, watcher(Api::<Pod>::all(client), config())).default_backoff();
    tokio::spawn(drive("services", services.touched_objects(), changed.clone()));
    tokio::spawn(drive("nodes", nodes.touched_objects(), changed.clone()));
    tokio::spawn(drive("namespaces", namespaces.touched_objects(), changed.clone()));
    tokio::spawn(drive("pods", pods.touched_objects(), changed.clone()));
    // One task waits for the first lists, and nothing else waits on these stores:
    // kube-runtime wakes only the last task that waited on a store's readiness, so a
    // second waiter could sleep through it.
    let (listed_tx, listed) = tokio::sync::oneshot::channel::<()>();
    {
        let (svc_reader, node_reader, ns_reader, pod_reader) =
            (svc_reader.clone(), node_reader.clone(), ns_reader.clone(), pod_reader.clone());
        tokio::spawn(async move {
            let listed = node_reader.wait_until_ready().await.is_ok()
                && svc_reader.wait_until_ready().await.is_ok()
                && ns_reader.wait_until_ready().await.is_ok()
                && pod_reader.wait_until_ready().await.is_ok();
            if listed {
                let _ = listed_tx.send(());
            }
        });
    }
    let objects =
        crate::intercepts::Objects { services: svc_reader.clone(), pods: pod_reader.clone(), changed: objects_rx };
    let mut learning_pods = false;
    tokio::spawn(async move {
        loop {
            changed.notified().await;
            tokio::time::sleep(DEBOUNCE).await;
            let services = svc_reader.state();
            let nodes = node_reader.state();
            // Pod IPs only matter when no node tells its pod CIDR.
            let from_pods = !nodes_have_pod_cidrs(&nodes);
            if from_pods && !nodes.is_empty() && !learning_pods {
                learning_pods = true;
                info!("no node reports podCIDRs: learning pod CIDRs from pod IPs");
            }
            let pods = if from_pods { pod_reader.state() } else { vec![] };
            let view = compute(&base, &services, &nodes, &pods);
            if publish(&tx, view.clone()) {
                info!(cidrs = ?view.cidrs, dns = ?view.dns, "cluster view changed");
            }
            let cat = catalog(&ns_reader.state(), &services);
            if cat != *current.catalog {
                info!(namespaces = cat.namespaces.len(), services = cat.services.len(), "catalog changed");
                current = Arc::new(crate::catalog::Version::next(&current, Arc::new(cat)));
                let _ = catalog_tx.send(current.clone());
            }
            objects_tx.send_modify(|n| *n += 1);
            if tx.is_closed() && catalog_tx.is_closed() && objects_tx.is_closed() {
                return;
            }
        }
    });
    // Serve clients with the listed view, not with the flags alone, when the API answers.
    let ready = async {
        if listed.await.is_ok() {
            tokio::time::sleep(DEBOUNCE * 2).await;
        }
    };
    if tokio::time::timeout(wait, ready).await.is_err() {
        warn!("the Kubernetes API did not answer in time; serving the flags' view until it does");
    }
    Views { cluster: rx, catalog: catalog_rx, objects: Some(objects) }
}

async fn drive<S, K>(what: &'static str, stream: S, changed: Arc<Notify>)
where
    S: futures::Stream<Item = Result<K, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(_) => changed.notify_one(),
            Err(e) => {
                warn!(error = %e, "watching {what} failed (the manager needs list and watch on {what}); retrying")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, ip: &str) -> Arc<Service> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": ns, "name": name},
                "spec": {"clusterIP": ip, "clusterIPs": [ip]}
            }))
            .unwrap(),
        )
    }

    fn node(cidrs: &[&str]) -> Arc<Node> {
        Arc::new(
            serde_json::from_value(serde_json::json!({"metadata": {"name": "n"}, "spec": {"podCIDRs": cidrs}}))
                .unwrap(),
        )
    }

    #[test]
    fn view_from_services_and_nodes() {
        let base = ClusterInfo { cidrs: vec![], dns: None, domain: "cluster.local".into() };
        let services = [
            svc("default", "a", "10.96.0.10"),
            svc("kube-system", "kube-dns", "10.96.0.53"),
            svc("default", "headless", "None"),
            svc("default", "v6", "fd00:10::5"),
        ];
        let v = compute(&base, &services, &[node(&["10.244.1.0/24"]), node(&["10.244.2.0/24"])], &[]);

        let want: Vec<IpNet> = ["10.96.0.0/16", "10.244.1.0/24", "10.244.2.0/24", "fd00:10::/112"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(v.cidrs, IpNet::aggregate(&want));
        assert_eq!(v.dns, Some("10.96.0.53".parse().unwrap()));
        // Services far apart widen the cover; flags add and override.
        let base = ClusterInfo {
            cidrs: vec!["192.0.2.0/24".parse().unwrap()],
            dns: Some("10.0.0.10".parse().unwrap()),
            domain: "c".into(),
        };
        let v = compute(&base, &[svc("a", "b", "10.96.0.1"), svc("a", "c", "10.100.0.1")], &[], &[]);
        assert!(
            v.cidrs.contains(&"10.96.0.0/13".parse().unwrap()) && v.cidrs.contains(&"192.0.2.0/24".parse().unwrap()),
            "{:?}",
            v.cidrs
        );
        assert_eq!(v.dns, Some("10.0.0.10".parse().unwrap()));
    }

    #[test]
    fn learned_cidrs_never_widen_past_a_slash_8() {
        let base = ClusterInfo { cidrs: vec![], dns: None, domain: "c".into() };
        // ClusterIPs (or pod IPs) from two far-apart ranges would need a /0.
        let v = compute(&base, &[svc("a", "b", "10.96.0.1"), svc("a", "c", "192.168.0.1")], &[], &[]);
        assert!(v.cidrs.is_empty(), "{:?}", v.cidrs);
        assert!(covering(&["0.0.0.1".parse().unwrap(), "255.0.0.1".parse().unwrap()]).is_none());
        assert!(covering(&["::1".parse().unwrap(), "ff00::1".parse().unwrap()]).is_none());
        assert_eq!(
            covering(&["10.0.0.1".parse().unwrap(), "10.255.0.1".parse().unwrap()]),
            Some("10.0.0.0/8".parse().unwrap())
        );
    }
}

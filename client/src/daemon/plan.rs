//! What `up` connects to: the manager target from the flags or the kubeconfig (discovery),
//! what to keep out of the tunnel, and finding the manager again on reconnects.

use std::time::Duration;

use ipnet::IpNet;
use tracing::{debug, info, warn};

use crate::cluster::{discovery, kubeconfig};
use crate::connect::{connect, Target, Transport, Via};
use crate::os::routes;
use crate::Error;

use super::{Source, UpOptions};

/// What the source tells `up`: the manager target and what to keep out of (or add to)
/// the tunnel.
pub(super) struct Plan {
    pub(super) target: Target,
    pub(super) context: Option<String>,
    pub(super) never_proxy: Vec<IpNet>,
    pub(super) also_proxy: Vec<IpNet>,
    /// The connected namespace: short names search it.
    pub(super) namespace: String,
    pub(super) include_suffixes: Vec<String>,
    pub(super) exclude_suffixes: Vec<String>,
    /// Where the credentials came from, when from the cluster.
    pub(super) rediscover: Option<Rediscover>,
}

/// How to read the manager's credentials from the cluster again (kubeconfig mode).
#[derive(Debug, Clone)]
pub(super) struct Rediscover {
    resolved: kubeconfig::Resolved,
    manager_flag: Option<String>,
    namespace: String,
    transport: crate::connect::Transport,
}

impl Rediscover {
    /// `target` with the CA and token the cluster holds now (the manager may have been
    /// reinstalled since). The address is kept: the routes keep exactly that address out
    /// of the tunnel.
    async fn refresh(&self, target: &Target) -> Result<Target, Error> {
        let keep = target.certificate.as_ref();
        let d = discovery::discover(&self.resolved, self.manager_flag.clone(), &self.namespace, self.transport, keep)
            .await?;
        Ok(Target { manager: target.manager.clone(), identity: target.identity.clone(), ..d.target })
    }
}

impl Rediscover {
    /// A new client certificate, asked of the cluster with the context's credentials.
    pub(super) async fn certificate(&self) -> Result<std::sync::Arc<crate::cluster::certificate::Issued>, Error> {
        let client = discovery::client(&self.resolved).await?;
        crate::cluster::certificate::request(&client, &self.resolved.context).await
    }
}

pub(super) async fn plan(opts: &UpOptions) -> Result<Plan, Error> {
    match &opts.source {
        Source::Direct { manager, ca_file, token_file } => Ok(Plan {
            target: Target { transport: opts.transport, ..Target::from_files(manager.clone(), ca_file, token_file)? },
            context: None,
            never_proxy: opts.never_proxy.clone(),
            also_proxy: opts.also_proxy.clone(),
            namespace: opts.namespace.clone().unwrap_or_else(|| "default".into()),
            include_suffixes: vec![],
            exclude_suffixes: vec![],
            rediscover: None,
        }),
        Source::Kube { kubeconfig, context, manager, manager_namespace } => {
            let r = kubeconfig::resolve(kubeconfig.as_deref(), context.as_deref())?;
            let d = discovery::discover(&r, manager.clone(), manager_namespace, opts.transport, None).await?;
            info!(context = %r.context, manager = ?d.target.manager, transport = ?opts.transport, "discovered the manager");
            let mut never = opts.never_proxy.clone();
            never.extend(r.extension.never_proxy.iter().copied());
            // The API server must stay reachable outside the tunnel.
            never.extend(d.api_server_ips.iter().map(|ip| routes::host(*ip)));
            let mut also = opts.also_proxy.clone();
            also.extend(r.extension.also_proxy.iter().copied());
            let rediscover = Rediscover {
                resolved: r.clone(),
                manager_flag: manager.clone(),
                namespace: manager_namespace.clone(),
                transport: opts.transport,
            };
            Ok(Plan {
                target: d.target,
                rediscover: Some(rediscover),
                context: Some(r.context),
                never_proxy: never,
                also_proxy: also,
                namespace: opts.namespace.clone().or(r.namespace).unwrap_or_else(|| "default".into()),
                include_suffixes: r.extension.include_suffixes,
                exclude_suffixes: r.extension.exclude_suffixes,
            })
        }
    }
}

fn same_certificate(a: &Target, b: &Target) -> bool {
    match (&a.certificate, &b.certificate) {
        (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
        (a, b) => a.is_none() && b.is_none(),
    }
}

/// A number in [0, 1), different in every call and every process.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Connects again until it works, with backoff (0.5 s doubling to 5 s). With
/// `--transport auto`, a session that went through the port-forward is reconnected
/// through it (UDP did not answer, and trying it costs
/// [`crate::connect::AUTO_QUIC_TIMEOUT`] each time), every fourth attempt of a
/// reconnection `auto` again in case UDP answers now (so while the port-forward keeps
/// reconnecting at once, UDP is not tried again until `up` is run again). In kubeconfig mode each failed attempt reads the
/// credentials from the cluster again, so a manager reinstalled with a new certificate
/// or token is reached too. Returns the session and the target it was made with.
pub(super) async fn reconnect(
    mut target: Target,
    rediscover: Option<Rediscover>,
    last: Via,
) -> (crate::connect::Session, Target) {
    let mut backoff = Duration::from_millis(500);
    let remembered = matches!((target.transport, &last), (Transport::Auto, Via::PortForward { .. }));
    let mut tries = 0u64;
    loop {
        tries += 1;
        let attempt = if remembered && !tries.is_multiple_of(4) {
            if tries == 1 {
                info!("reconnecting through the port-forward, as the last session did");
            }
            connect(&Target { transport: Transport::Portforward, ..target.clone() }).await
        } else {
            connect(&target).await
        };
        match attempt {
            Ok(session) => return (session, target),
            Err(e) => {
                warn!(error = %e, "reconnecting to the manager failed");
                if let Some(r) = &rediscover {
                    match r.refresh(&target).await {
                        Ok(fresh)
                            if fresh.ca_pem != target.ca_pem
                                || fresh.token != target.token
                                || !same_certificate(&fresh, &target) =>
                        {
                            info!(source = %fresh.token_source, "the manager's credentials changed; using the new ones");
                            target = fresh;
                            // New credentials deserve a try at once.
                            continue;
                        }
                        Ok(_) => {}
                        Err(e) => debug!(error = %e, "cannot read the manager's credentials again"),
                    }
                }
                // Jitter, so that the clients of a restarted manager do not all come back at once.
                let wait = backoff + backoff.mul_f64(jitter() * 0.5);
                debug!("trying again in {wait:?}");
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

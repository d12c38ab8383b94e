//! The signer's controller: the client CA kept in the cluster, and every
//! CertificateSigningRequest of signer [`SIGNER_NAME`] answered.
//!
//! - The CA's key lives in Secret [`CA_SECRET`] of the manager's namespace (created on
//!   first start, read by no one else); its certificate, with the manager's serving
//!   certificate, in ConfigMap [`TRUST_CONFIGMAP`] (`client-ca.crt`, `ca.crt`): public,
//!   so that laptops need no Secret to connect.
//! - Each request is judged by [`decide`]; one that may be reviewed is signed only if
//!   the API server allows its requester [`CONNECT`]. Then approved (`approval`
//!   subresource, condition `Approved`), then signed (`status.certificate`); a request
//!   approved that cannot be signed is marked `Failed`, never left approved without a
//!   certificate. Requests approved but unsigned when the manager starts (it stopped
//!   between the two) are signed then.
//! - Denials carry the reason as the condition's message, which `tpvpn up` shows.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestCondition};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::ByteString;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use tracing::{info, warn};

use super::access::{Access, Denied, CONNECT};
use super::signer::{decide, Ca, Decision, MAX_AGE, SIGNER_NAME};

/// The Secret holding the client CA's certificate and key (`tls.crt`, `tls.key`).
pub const CA_SECRET: &str = "tpvpn-client-ca";
/// The public ConfigMap with the manager's serving certificate and the client CA.
pub const TRUST_CONFIGMAP: &str = "tpvpn-trust";
/// Its keys.
pub const TRUST_SERVER_CA: &str = "ca.crt";
pub const TRUST_CLIENT_CA: &str = "client-ca.crt";
/// The condition reason of every decision of this signer.
const REASON: &str = "TpvpnPolicy";

/// The client CA of `namespace`: read from its Secret, or made and stored there; and the
/// trust ConfigMap written (with `serving_cert_pem`).
pub async fn client_ca(client: &kube::Client, namespace: &str, serving_cert_pem: &str) -> Result<Ca, String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let what = format!("Secret {namespace}/{CA_SECRET}");
    let ca = match secrets.get_opt(CA_SECRET).await.map_err(|e| format!("cannot read {what}: {e}"))? {
        Some(secret) => ca_of(&secret).map_err(|e| format!("{what}: {e}"))?,
        None => {
            let ca = Ca::generate(SystemTime::now())?;
            let secret: Secret = serde_json::from_value(serde_json::json!({
                "metadata": {"name": CA_SECRET, "namespace": namespace},
                "type": "kubernetes.io/tls",
                "stringData": {"tls.crt": ca.cert_pem(), "tls.key": ca.key_pem()},
            }))
            .map_err(|e| e.to_string())?;
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(_) => {
                    info!(secret = %what, "created the client CA");
                    ca
                }
                // Another replica made it first: theirs is the one.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let secret = secrets.get(CA_SECRET).await.map_err(|e| format!("cannot read {what}: {e}"))?;
                    ca_of(&secret).map_err(|e| format!("{what}: {e}"))?
                }
                Err(e) => return Err(format!("cannot create {what}: {e}")),
            }
        }
    };
    let trust = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": TRUST_CONFIGMAP, "namespace": namespace},
        "data": {TRUST_SERVER_CA: serving_cert_pem, TRUST_CLIENT_CA: ca.cert_pem()},
    });
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    maps.patch(TRUST_CONFIGMAP, &PatchParams::apply("tpvpn-manager").force(), &Patch::Apply(&trust))
        .await
        .map_err(|e| format!("cannot write ConfigMap {namespace}/{TRUST_CONFIGMAP}: {e}"))?;
    Ok(ca)
}

/// In `--auth token`: the trust ConfigMap, if there is one, loses its client CA, so that
/// laptops use the shared token instead of asking for certificates no one signs.
pub async fn withdraw_client_ca(client: &kube::Client, namespace: &str) -> Result<(), String> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let patch = serde_json::json!({"data": {TRUST_CLIENT_CA: null}});
    match maps.patch(TRUST_CONFIGMAP, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(format!("cannot update ConfigMap {namespace}/{TRUST_CONFIGMAP}: {e}")),
    }
}

fn ca_of(secret: &Secret) -> Result<Ca, String> {
    let data = secret.data.clone().unwrap_or_default();
    let field =
        |k: &str| data.get(k).map(|b| String::from_utf8_lossy(&b.0).into_owned()).ok_or_else(|| format!("no `{k}`"));
    Ca::from_pem(&field("tls.crt")?, &field("tls.key")?)
}

/// Answers every request of this signer, for as long as the manager runs; no
/// certificate lives longer than `max_lifetime`.
pub async fn sign_requests(client: kube::Client, ca: Arc<Ca>, max_lifetime: Duration) {
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let mut events = watcher(api.clone(), watcher::Config::default()).default_backoff().applied_objects().boxed();
    // Requests answered lately: the watch then shows each again (approved, signed).
    let mut answered: HashMap<String, Instant> = HashMap::new();
    info!(signer = SIGNER_NAME, "signing laptops' certificate requests");
    while let Some(event) = events.next().await {
        let csr = match event {
            Ok(csr) => csr,
            Err(e) => {
                warn!(error = %e, "watching certificate requests");
                continue;
            }
        };
        answered.retain(|_, at| at.elapsed() < MAX_AGE * 2);
        let uid = csr.metadata.uid.clone().unwrap_or_default();
        if answered.contains_key(&uid) {
            continue;
        }
        if answer(&api, &client, &ca, csr, max_lifetime).await {
            answered.insert(uid, Instant::now());
        }
    }
}

/// Answers one request; whether it was one of ours.
async fn answer(
    api: &Api<CertificateSigningRequest>,
    client: &kube::Client,
    ca: &Ca,
    csr: CertificateSigningRequest,
    max_lifetime: Duration,
) -> bool {
    let name = csr.metadata.name.clone().unwrap_or_default();
    let now = SystemTime::now();
    let (identity, lifetime, approved) = match decide(&csr, now) {
        Decision::NotOurs => return false,
        Decision::Deny(why) => {
            conclude(api, csr, "Denied", &why).await;
            return true;
        }
        Decision::Review { identity, lifetime, approved } => (identity, lifetime.min(max_lifetime), approved),
    };
    if let Err(denied) = Access::new(client.clone()).check(&identity, &CONNECT).await {
        let why = match denied {
            Denied::NotAllowed { .. } => format!("{denied}: ask for the ClusterRole tpvpn-user"),
            Denied::Unavailable(_) => denied.to_string(),
        };
        if approved {
            conclude(api, csr, "Failed", &why).await;
        } else {
            conclude(api, csr, "Denied", &why).await;
        }
        return true;
    }
    let csr = if approved {
        csr
    } else {
        match set_condition(api, csr, "Approved", &format!("{} may connect", identity.username)).await {
            Ok(csr) => csr,
            Err(e) => {
                // Another replica answered it, or it is gone: nothing left to do here.
                warn!(csr = %name, error = %e, "cannot approve a certificate request");
                return true;
            }
        }
    };
    let request = String::from_utf8_lossy(&csr.spec.request.0).into_owned();
    let signed = ca.issue(&request, &identity, now, lifetime);
    let result = match signed {
        Ok(pem) => {
            let mut csr = csr.clone();
            csr.status.get_or_insert_default().certificate = Some(ByteString(pem.into_bytes()));
            api.replace_subresource("status", &name, &PostParams::default(), &csr)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => {
            info!(csr = %name, user = %identity.username, lifetime_s = lifetime.as_secs(), "signed a laptop's certificate")
        }
        Err(e) => {
            warn!(csr = %name, error = %e, "cannot sign an approved certificate request");
            conclude(api, csr, "Failed", &format!("the manager could not sign it: {e}")).await;
        }
    }
    true
}

/// Marks a request `Denied` (through `approval`) or `Failed` (through `status`).
async fn conclude(api: &Api<CertificateSigningRequest>, csr: CertificateSigningRequest, kind: &str, why: &str) {
    let name = csr.metadata.name.clone().unwrap_or_default();
    let user = csr.spec.username.clone().unwrap_or_default();
    match set_condition(api, csr, kind, why).await {
        Ok(_) => info!(csr = %name, %user, condition = kind, reason = why, "answered a certificate request"),
        Err(e) => warn!(csr = %name, condition = kind, error = %e, "cannot answer a certificate request"),
    }
}

/// Adds condition `kind` to `csr` through the subresource that takes it.
async fn set_condition(
    api: &Api<CertificateSigningRequest>,
    mut csr: CertificateSigningRequest,
    kind: &str,
    message: &str,
) -> kube::Result<CertificateSigningRequest> {
    let name = csr.metadata.name.clone().unwrap_or_default();
    let now = k8s_openapi::jiff::Timestamp::now();
    csr.status.get_or_insert_default().conditions.get_or_insert_default().push(CertificateSigningRequestCondition {
        type_: kind.into(),
        status: "True".into(),
        reason: Some(REASON.into()),
        message: Some(message.into()),
        last_update_time: Some(Time(now)),
        last_transition_time: Some(Time(now)),
    });
    let subresource = if kind == "Failed" { "status" } else { "approval" };
    api.replace_subresource(subresource, &name, &PostParams::default(), &csr).await
}

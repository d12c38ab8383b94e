//! The laptop's identity where the manager signs client certificates (`--auth
//! kubernetes`, issue 21): a key made here that never leaves this process, a
//! CertificateSigningRequest created with the kubeconfig's own credentials (so the API
//! server stamps who made it: OIDC, exec plugins, client certificates all work), and the
//! certificate the manager's signer [`SIGNER_NAME`] issues for it, presented as the TLS
//! client certificate. No credential of the user's ever reaches the manager.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Api, PostParams};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tpvpn_tunnel::quic::ClientCert;

use crate::Error;

/// The manager's signer.
pub const SIGNER_NAME: &str = "tpvpn.dev/client";
/// The lifetime asked for.
pub const LIFETIME: Duration = Duration::from_secs(3600);
/// How long the signer has to answer.
pub const WAIT: Duration = Duration::from_secs(30);
/// A certificate with less left than this is not used for a new connection.
pub const RENEW_BEFORE: Duration = Duration::from_secs(5 * 60);

/// A certificate this laptop holds, and whom the API server said it is for.
#[derive(Debug)]
pub struct Issued {
    pub cert: ClientCert,
    pub user: String,
    pub groups: Vec<String>,
    /// The certificate's `notAfter`.
    pub expires: SystemTime,
    /// When it was received.
    pub received: SystemTime,
}

impl Issued {
    /// Whether a new connection may still use it.
    pub fn fresh(&self, now: SystemTime) -> bool {
        self.expires.duration_since(now).is_ok_and(|left| left > RENEW_BEFORE)
    }

    /// When to renew it on a live session: at two thirds of its life.
    pub fn renew_at(&self) -> SystemTime {
        self.received + self.expires.duration_since(self.received).unwrap_or_default() * 2 / 3
    }
}

/// Presents `issued` on the live session `conn` in place of its certificate (a manager
/// offering [`tpvpn_tunnel::handshake::FEATURE_RENEW`]): with a proof that this end of
/// the connection holds its key. The manager's answer, or why not.
pub async fn renew(conn: &quinn::Connection, issued: &Issued) -> Result<String, Error> {
    let der = issued.cert.chain.first().ok_or_else(|| Error::System("no certificate to present".into()))?;
    let binding = tpvpn_tunnel::quic::renewal_binding(conn, der)?;
    let proof = tpvpn_tunnel::quic::sign(&issued.cert.key, &binding)?;
    let req = tpvpn_tunnel::Message::Renew { certificate: der.to_vec(), proof };
    match crate::intercept::exchange(conn, &req).await? {
        tpvpn_tunnel::Message::Ack { message } => Ok(message),
        other => Err(crate::intercept::unexpected(other)),
    }
}

/// Makes a key, asks the cluster of `client` for a certificate for it, waits for the
/// signer's answer ([`WAIT`]). `context` names the kubeconfig context in messages.
pub async fn request(client: &kube::Client, context: &str) -> Result<Arc<Issued>, Error> {
    let key = rcgen::KeyPair::generate().map_err(|e| Error::System(format!("cannot make a key: {e}")))?;
    let pem = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| Error::System(format!("cannot make a certificate request: {e}")))?;
    let name = format!("tpvpn-{}", random_hex());
    let csr: CertificateSigningRequest = serde_json::from_value(serde_json::json!({
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": {"name": name},
        "spec": {
            "request": base64_of(pem.as_bytes()),
            "signerName": SIGNER_NAME,
            "usages": ["digital signature", "client auth"],
            "expirationSeconds": LIFETIME.as_secs(),
        },
    }))
    .map_err(|e| Error::System(e.to_string()))?;
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let created = api.create(&PostParams::default(), &csr).await.map_err(|e| match e {
        kube::Error::Api(s) if s.code == 403 => Error::Kubernetes(format!(
            "context `{context}` may not create CertificateSigningRequests ({}); ask a cluster admin for the ClusterRole tpvpn-user",
            s.message
        )),
        e => Error::Kubernetes(format!("cannot ask the cluster of context `{context}` for a certificate: {e}")),
    })?;
    let user = created.spec.username.clone().unwrap_or_default();
    let groups = created.spec.groups.clone().unwrap_or_default();
    let deadline = Instant::now() + WAIT;
    let mut wait = Duration::from_millis(100);
    let der = loop {
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(1));
        let now = match api.get(&name).await {
            Ok(now) => now,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "reading the certificate request");
                continue;
            }
            Err(e) => return Err(Error::Kubernetes(format!("cannot read certificate request {name}: {e}"))),
        };
        match answer(&now) {
            Answer::Certificate(der) => break der,
            Answer::Refused(why) => return Err(Error::Kubernetes(format!("the manager refused {user} a certificate: {why}"))),
            Answer::Pending if Instant::now() >= deadline => {
                return Err(Error::Kubernetes(format!(
                    "no answer to certificate request {name} within {}s: the manager is not running, or lacks the RBAC to sign for {SIGNER_NAME}",
                    WAIT.as_secs()
                )))
            }
            Answer::Pending => {}
        }
    };
    let expires = check(&der, &key)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    tracing::info!(%user, csr = %name, "got a client certificate");
    let received = SystemTime::now();
    Ok(Arc::new(Issued { cert: ClientCert { chain: vec![der], key }, user, groups, expires, received }))
}

enum Answer {
    Pending,
    Certificate(CertificateDer<'static>),
    Refused(String),
}

/// What the signer said about a request.
fn answer(csr: &CertificateSigningRequest) -> Answer {
    let status = csr.status.as_ref();
    let conditions = status.and_then(|s| s.conditions.as_deref()).unwrap_or_default();
    if let Some(c) = conditions.iter().find(|c| (c.type_ == "Denied" || c.type_ == "Failed") && c.status == "True") {
        let why = c.message.clone().filter(|m| !m.is_empty()).unwrap_or_else(|| c.type_.to_lowercase());
        return Answer::Refused(why);
    }
    let Some(pem) = status.and_then(|s| s.certificate.as_ref()).filter(|c| !c.0.is_empty()) else {
        return Answer::Pending;
    };
    use rustls::pki_types::pem::PemObject;
    match CertificateDer::from_pem_slice(&pem.0) {
        Ok(der) => Answer::Certificate(der.into_owned()),
        Err(e) => Answer::Refused(format!("the certificate issued is not PEM: {e}")),
    }
}

/// The certificate's `notAfter`, once it is known to be for `key`.
fn check(der: &CertificateDer<'_>, key: &rcgen::KeyPair) -> Result<SystemTime, Error> {
    use x509_parser::prelude::*;
    let bad = |why: &str| Error::Kubernetes(format!("the certificate the signer issued {why}"));
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| bad("cannot be read"))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(bad("is not for this laptop's key"));
    }
    let secs = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

fn random_hex() -> String {
    let mut b = [0u8; 16];
    // A failing system RNG leaves zeros: the name then clashes, and create says so.
    let _ = rustls::crypto::ring::default_provider().secure_random.fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn base64_of(b: &[u8]) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::certificates::v1::{CertificateSigningRequestCondition, CertificateSigningRequestStatus};

    #[test]
    fn request_names_are_random() {
        assert_eq!(random_hex().len(), 32);
        assert_ne!(random_hex(), random_hex());
    }

    fn with_status(conditions: Vec<(&str, &str)>, cert: Option<&[u8]>) -> CertificateSigningRequest {
        let conditions = conditions
            .into_iter()
            .map(|(t, m)| CertificateSigningRequestCondition {
                type_: t.into(),
                status: "True".into(),
                message: Some(m.into()),
                ..CertificateSigningRequestCondition::default()
            })
            .collect();
        CertificateSigningRequest {
            status: Some(CertificateSigningRequestStatus {
                conditions: Some(conditions),
                certificate: cert.map(|c| k8s_openapi::ByteString(c.to_vec())),
            }),
            ..CertificateSigningRequest::default()
        }
    }

    #[test]
    fn the_signers_answer_is_read_from_conditions_and_certificate() {
        assert!(matches!(answer(&CertificateSigningRequest::default()), Answer::Pending));
        assert!(matches!(answer(&with_status(vec![("Approved", "ok")], None)), Answer::Pending));
        let denied = with_status(vec![("Denied", "user \"bob\" may not create connections.tpvpn.dev")], None);
        assert!(matches!(answer(&denied), Answer::Refused(m) if m.contains("may not create connections")));
        assert!(
            matches!(answer(&with_status(vec![("Approved", ""), ("Failed", "")], None)), Answer::Refused(m) if m == "failed")
        );
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::default().self_signed(&key).unwrap();
        let issued = with_status(vec![("Approved", "")], Some(cert.pem().as_bytes()));
        let Answer::Certificate(der) = answer(&issued) else { panic!("a certificate") };
        assert!(check(&der, &key).is_ok_and(|t| t > SystemTime::now()));
        let other = rcgen::KeyPair::generate().unwrap();
        assert!(check(&der, &other).unwrap_err().to_string().contains("not for this laptop's key"));
    }
}

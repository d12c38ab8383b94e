//! Node agents' identities. In `--auth kubernetes` (the default whenever the manager
//! talks to a Kubernetes API) each presents its pod's projected ServiceAccount token
//! with audience [`AUDIENCE`], and the API server says whose it is (a `TokenReview`):
//! only the agents' ServiceAccount (`<namespace>-agents/tpvpn-agent` unless
//! `--agent-service-account` says otherwise), and only for the node its pod runs on
//! (the review's `authentication.kubernetes.io/node-name`), so that no node can pose as
//! another's agent. In `--auth token` agents share the `--agent-token-file` token, as
//! before. [`judge`] is the decision, a pure function of the review's answer.

use std::sync::Arc;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;
use tokio::sync::Semaphore;
use tpvpn_tunnel::ErrorCode;
use tracing::{info, warn};

/// The audience agents' tokens are for.
pub const AUDIENCE: &str = "tpvpn.dev/manager";
/// The user `extra` key with the node of the pod a token is bound to.
pub const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// The largest token sent for review: projected tokens are a few KiB.
const TOKEN_MAX: usize = 16 * 1024;
/// Reviews at once: each unauthenticated hello claiming to be an agent costs the API
/// server one.
const REVIEWS_AT_ONCE: usize = 8;

/// How node agents authenticate.
#[derive(Clone, Default)]
pub enum AgentAuth {
    /// No agent can connect (no Kubernetes, no `--agent-token-file`).
    #[default]
    None,
    /// The shared `--agent-token-file` token (`--auth token`).
    Token(Vec<u8>),
    /// Their ServiceAccount tokens, reviewed by the API server (`--auth kubernetes`).
    Kubernetes(Arc<Reviewer>),
}

impl std::fmt::Debug for AgentAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AgentAuth::None => "None",
            AgentAuth::Token(_) => "Token",
            AgentAuth::Kubernetes(_) => "Kubernetes",
        })
    }
}

/// Reviews agents' tokens with the API server.
pub struct Reviewer {
    client: kube::Client,
    /// `system:serviceaccount:NS:NAME`: the only user an agent may be.
    account: String,
    permits: Semaphore,
}

/// Why an agent was refused: `Unauthorized` (its token says it may not), or
/// `Unavailable` (the review could not be made; it may try again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: ErrorCode,
    pub message: String,
}

impl Reviewer {
    /// Accepts ServiceAccount `namespace/name`'s tokens.
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Reviewer {
        Reviewer {
            client,
            account: format!("system:serviceaccount:{namespace}:{name}"),
            permits: Semaphore::new(REVIEWS_AT_ONCE),
        }
    }

    /// Whether `token` is that of the agent of `node`.
    pub async fn agent(&self, token: &[u8], node: &str) -> Result<(), Refused> {
        let refused = |message: String| Refused { code: ErrorCode::Unauthorized, message };
        let token = std::str::from_utf8(token)
            .ok()
            .filter(|t| t.len() <= TOKEN_MAX && t.split('.').count() == 3)
            .ok_or_else(|| refused("the agent token is not valid: not a ServiceAccount token".into()))?;
        let _permit = self.permits.acquire().await.map_err(|_| refused("shutting down".into()))?;
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_string()), audiences: Some(vec![AUDIENCE.to_string()]) },
            ..TokenReview::default()
        };
        let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let answer = api.create(&PostParams::default(), &review).await.map_err(|e| {
            warn!(error = %e, "cannot review an agent's token");
            Refused {
                code: ErrorCode::Unavailable,
                message: format!("the manager cannot check agent tokens now (TokenReview: {e})"),
            }
        })?;
        let verdict = judge(answer.status.as_ref(), &self.account, node);
        match &verdict {
            Ok(()) => info!(node, account = %self.account, "agent token reviewed: accepted"),
            Err(why) => warn!(node, %why, "agent token reviewed: refused"),
        }
        verdict.map_err(refused)
    }
}

/// Whether a review's `status` makes its token that of `account`'s agent on `node`, for
/// [`AUDIENCE`]; why not, in one line.
pub fn judge(status: Option<&TokenReviewStatus>, account: &str, node: &str) -> Result<(), String> {
    let Some(status) = status.filter(|s| s.authenticated == Some(true)) else {
        let why = status.and_then(|s| s.error.clone()).unwrap_or_else(|| "not authenticated".into());
        return Err(format!("the agent token is not valid: {why}"));
    };
    if !status.audiences.iter().flatten().any(|a| a == AUDIENCE) {
        return Err(format!("the agent token is not for audience {AUDIENCE}"));
    }
    let user = status.user.as_ref();
    let name = user.and_then(|u| u.username.as_deref()).unwrap_or_default();
    if name != account {
        return Err(format!("the agent token is {name}'s; agents must be {account}"));
    }
    let nodes = user.and_then(|u| u.extra.as_ref()).and_then(|e| e.get(NODE_NAME)).cloned().unwrap_or_default();
    match nodes.as_slice() {
        [n] if n == node => Ok(()),
        [n] => Err(format!("the agent token belongs to a pod on node {n}, not to node {node}")),
        _ => Err(format!(
            "the agent token names no node: it must be the agent pod's projected token (audience {AUDIENCE})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    const AGENT: &str = "system:serviceaccount:tpvpn-agents:tpvpn-agent";

    fn status(user: &str, node: Option<&str>, audience: &str) -> TokenReviewStatus {
        let extra = node.map(|n| [(NODE_NAME.to_string(), vec![n.to_string()])].into_iter().collect());
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec![audience.into()]),
            user: Some(UserInfo { username: Some(user.into()), extra, ..UserInfo::default() }),
            error: None,
        }
    }

    #[test]
    fn only_the_agents_account_for_its_own_node_and_audience() {
        assert_eq!(judge(Some(&status(AGENT, Some("n1"), AUDIENCE)), AGENT, "n1"), Ok(()));
        let e = judge(Some(&status(AGENT, Some("n1"), AUDIENCE)), AGENT, "n2").unwrap_err();
        assert_eq!(e, "the agent token belongs to a pod on node n1, not to node n2");
        let e = judge(Some(&status(AGENT, None, AUDIENCE)), AGENT, "n1").unwrap_err();
        assert!(e.contains("names no node"), "{e}");
        let other = "system:serviceaccount:default:default";
        let e = judge(Some(&status(other, Some("n1"), AUDIENCE)), AGENT, "n1").unwrap_err();
        assert!(e.contains("agents must be system:serviceaccount:tpvpn-agents:tpvpn-agent"), "{e}");
        let e = judge(Some(&status(AGENT, Some("n1"), "https://kubernetes.default.svc")), AGENT, "n1").unwrap_err();
        assert!(e.contains("not for audience tpvpn.dev/manager"), "{e}");
        let failed = TokenReviewStatus { error: Some("token has expired".into()), ..TokenReviewStatus::default() };
        assert_eq!(judge(Some(&failed), AGENT, "n1").unwrap_err(), "the agent token is not valid: token has expired");
        assert!(judge(None, AGENT, "n1").is_err());
    }
}

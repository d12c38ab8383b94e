//! A **stand-in** for the Kubernetes API server (`tpvpn-lab apiserver`).
//!
//! No real API server (etcd, kube-apiserver) can run in the lab, so this is a
//! small in-memory imitation of the few endpoints tpvpn uses, served
//! over plain HTTP/1.1 (keep-alive, chunked watch streams) so that the real
//! `kube` client works against it, and over HTTPS ([`Tls`], HTTP/1.1 only) for the
//! real `kubectl`, which sends credentials only over TLS (`lab/tests/kubectl.rs` runs
//! the README's commands with it). It is not a Kubernetes implementation.
//!
//! Semantics kept from the real API server:
//! - A static table of resources ([`Resource`]), as plain Kubernetes JSON
//!   objects; lists are sorted by namespace and name. Core `v1` (`/api/v1`):
//!   `namespaces`, `nodes` (cluster-scoped), `services`, `pods`, `secrets`,
//!   `configmaps`, `serviceaccounts` (namespaced); `rbac.authorization.k8s.io/v1`
//!   (`/apis/{group}/v1`): `clusterroles`, `clusterrolebindings`
//!   (cluster-scoped), `roles`, `rolebindings`; `apps/v1`: `deployments`, `daemonsets`;
//!   `certificates.k8s.io/v1`: `certificatesigningrequests` (cluster-scoped; the
//!   requester stamped on create, the `approval` and `status` subresources, [`csr`]).
//!   Other paths: 404 `the server could not find the requested resource`.
//!   Discovery: `/api`, `/api/v1`, `/apis` (APIGroupList), `/apis/{group}`,
//!   `/apis/{group}/v1` (APIResourceList; the review kinds under
//!   `authentication.k8s.io` and `authorization.k8s.io`, `create` only, which
//!   `kubectl create -f` of a review needs); no aggregated discovery.
//! - One global `resourceVersion` counter (like etcd's revision): every
//!   create/update/delete bumps it and records an event in a bounded history
//!   ([`DEFAULT_HISTORY`] events). Server-managed metadata (`uid`,
//!   `resourceVersion`, `creationTimestamp`) is filled in.
//! - GET (one or a list, with `labelSelector` `=`/`==`/`!=`/`key`/`!key` and
//!   `fieldSelector` on `metadata.name`/`metadata.namespace`), POST (create,
//!   409 if it exists), PUT (replace, 409 on a stale `metadata.resourceVersion`),
//!   PATCH (JSON merge patch, and server-side apply, below), DELETE (returns the
//!   deleted object). Deleting a Namespace first deletes every namespaced
//!   object in it (a `DELETED` event each; no `Terminating` phase).
//! - Server-side apply (`PATCH` with `Content-Type: application/apply-patch+yaml`,
//!   what kube's `Patch::Apply` sends), approximated: `fieldManager` is
//!   required (400), `force` is ignored (no field ownership, no conflicts);
//!   the body must be JSON (YAML's JSON subset) with the URL's `apiVersion`,
//!   `kind`, name (and namespace, if given). A missing object is created
//!   (201, `ADDED`); an existing one gets the applied fields merged over it
//!   (maps merged recursively, applied values win, lists replaced, `null`
//!   removes; fields dropped from the applied configuration are NOT removed)
//!   and keeps its resourceVersion (no event) if nothing changed, so applying
//!   the same object twice is a no-op. A Service keeps its allocated
//!   clusterIP and node ports (matched by port and protocol).
//! - Deployments: `spec.replicas` defaults to 1, `metadata.generation` starts
//!   at 1 and grows when the spec changes; no status (no controllers run).
//! - Watches (`?watch=true`): no / `"0"` resourceVersion → `ADDED` for every
//!   current object, then live events; `resourceVersion=N` → replay of the
//!   events after N, then live; N older than the kept history → one `ERROR`
//!   event with a 410 `Expired` Status. Objects moving into / out of a
//!   selector's match on update are sent as `ADDED` / `DELETED`. Optional
//!   `BOOKMARK`s, `sendInitialEvents=true` (initial events, then a bookmark
//!   annotated `k8s.io/initial-events-end`), `timeoutSeconds` (default 300 s,
//!   capped at 600 s).
//! - Request bodies in protobuf (what kubectl sends for built-in kinds) for the kinds
//!   its `create rolebinding|clusterrolebinding`, `auth can-i` and `certificate
//!   approve|deny` send ([`protobuf`]);
//!   other protobuf bodies get `415`. Answers are always JSON (kubectl accepts them).
//! - Errors are `Status` objects with the real reasons and messages (NotFound,
//!   AlreadyExists, Conflict, Invalid, BadRequest, Unauthorized, Forbidden,
//!   MethodNotAllowed, Expired).
//! - Bearer-token authentication: an admin token (allowed everything) and an
//!   optional "no-secrets" token that gets RBAC-style 403s for `secrets`, and a
//!   "no-portforward" one that gets them for `pods/portforward`; users of a token
//!   file (`--token-auth-file`) get what RBAC grants them ([`rbac`]).
//! - `TokenReview`, `SubjectAccessReview` and `SelfSubjectAccessReview` (`POST`, answered from the token file's
//!   users, the ServiceAccount tokens it issued and the RBAC authorizer; [`review`]'s docs
//!   say what is kept), and ServiceAccount tokens by `TokenRequest` (`POST
//!   …/serviceaccounts/NAME/token`, [`tokens`]).
//! - `pods/{name}/portforward` over WebSocket, the kubelet's part included
//!   ([`portforward`]'s docs say what is kept).
//! - Service defaulting: `type: ClusterIP`, port `protocol: TCP` and
//!   `targetPort`, a ClusterIP allocated from [`CLUSTER_IP_POOL`] when absent
//!   (immutable on update), node ports allocated from 30000-32767.
//!
//! Not kept: other resources and API groups, protobuf answers (and bodies but above),
//! server-side `Table`s (kubectl prints names and ages only), OpenAPI (`kubectl apply`
//! and `create` need `--validate=false`), HTTP/2, `limit`/
//! `continue` paging (everything is returned, no continue token), set-based
//! label selectors, subresources (but port-forward, ServiceAccount tokens and a CSR's
//! `approval` and `status`, by PUT), JSON/strategic patches, `managedFields`,
//! `dryRun` (400), finalizers, garbage collection by owner references, controllers
//! (no Pods for Deployments), admission and validation.
//!
//! Stand-in only: `POST /_standin/compact` (admin token) drops all watch
//! history, so any older resourceVersion then yields 410 Gone, and ends every open
//! watch with a 410 ERROR event (a watch that fell behind), so clients must list again.

mod csr;
mod filter;
mod http;
mod portforward;
mod protobuf;
mod rbac;
mod resource;
mod review;
mod store;
#[cfg(test)]
mod tests;
mod tokens;

pub use filter::*;
pub use http::*;
pub use portforward::PORTFORWARD_PROTOCOL;
pub use rbac::*;
pub use resource::*;
pub use review::*;
pub use store::*;
pub use tokens::{Issued, API_AUDIENCE};

/// Events kept for watch replay.
pub const DEFAULT_HISTORY: usize = 1000;
/// Where Services without a `spec.clusterIP` get one (`10.96.100.1`..`.254`).
pub const CLUSTER_IP_POOL: &str = "10.96.100.0/24";
/// The user name the "no-secrets" token authenticates as (in 403 messages).
pub const NO_SECRETS_USER: &str = "lab-user";
/// The user name the "no-portforward" token authenticates as (in 403 messages).
pub const NO_PORTFORWARD_USER: &str = "lab-dev";
/// Default and maximum `timeoutSeconds` of a watch.
const WATCH_TIMEOUT_DEFAULT: u64 = 300;
const WATCH_TIMEOUT_MAX: u64 = 600;
/// Largest accepted request body (like the real API server's 3 MiB).
const MAX_BODY: usize = 3 << 20;

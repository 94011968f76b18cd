//! The admin socket's one gate. Every admin call passes through `OperatorLayer` before a
//! handler runs: the caller's peer credentials are checked (root and the daemon's own user
//! may administer it, nobody else, whatever the socket's mode says) and a refusal goes on
//! the audit trail, aggregated so that a loop of refused calls cannot flood it. A handler
//! reads the checked caller with `Operator::of` and records what it changed with
//! `Operator::event`, so no method can skip the check or make an unattributed record.

use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::Either;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};

use crate::audit::{Actor, Audit, Event};
use crate::policy::{Access, AccessContext, Action, PolicyEngine, Principal, Resource, Source};

/// The caller of an admin method, as the gate checked it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    pub uid: u32,
    /// The hash of the policy set that let the call through ("" for the calls no policy
    /// decides): every record of what the call changed carries it.
    pub policy_set: Arc<str>,
}

impl Operator {
    /// The checked caller of `request`. The gate is installed with the admin service, so
    /// a request without one did not come through it and is refused.
    pub fn of<T>(request: &Request<T>) -> Result<Self, Status> {
        request
            .extensions()
            .get::<Operator>()
            .cloned()
            .ok_or_else(|| Status::internal("the admin call did not pass the operator check"))
    }

    pub fn actor(&self) -> Actor {
        Actor::Operator(self.uid)
    }

    /// An audit record of this operator's change, with the policy set that allowed it.
    pub fn event(&self, action: &str, subject: &str) -> Event {
        let event = Event::new(&self.actor(), action, subject);
        if self.policy_set.is_empty() {
            event
        } else {
            event.detail(serde_json::json!({ "policy_set": &*self.policy_set }))
        }
    }
}

/// Admin calls the policies do not decide, so that no policy can lock the operators out
/// of seeing and replacing the policies themselves.
const UNDECIDED: [&str; 2] = ["ShowPolicy", "ReloadPolicy"];

/// Installs the gate on the admin server (`Server::builder().layer(..)`).
#[derive(Clone)]
pub struct OperatorLayer {
    audit: Audit,
    /// The daemon's own effective uid, which may administer it besides root.
    own_uid: u32,
    policy: Arc<PolicyEngine>,
}

impl OperatorLayer {
    pub fn new(audit: Audit, policy: Arc<PolicyEngine>) -> Self {
        Self {
            audit,
            own_uid: crate::sys::effective_uid(),
            policy,
        }
    }

    /// The caller, or the refusal to answer with (already on the audit trail).
    fn check<B>(&self, request: &http::Request<B>) -> Result<Operator, Status> {
        let call = method_name(request.uri().path());
        let uid = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .map(|cred| cred.uid())
            .ok_or_else(|| Status::unauthenticated("the caller's credentials are unknown"))?;
        if uid != 0 && uid != self.own_uid {
            tracing::warn!(uid, call = %call, "admin call refused");
            let why = format!("uid {uid} may not administer this daemon");
            self.audit.note_refusal(
                Event::new(&Actor::Operator(uid), "admin.denied", &call).denied(why.clone()),
            );
            return Err(Status::permission_denied(why));
        }
        let method = request.uri().path().rsplit('/').next().unwrap_or_default();
        let mut policy_set: Arc<str> = Arc::from("");
        if !UNDECIDED.contains(&method) {
            let name = uzers::get_user_by_uid(uid)
                .map(|u| u.name().to_string_lossy().into_owned())
                .unwrap_or_default();
            let access = Access {
                principal: Principal::Operator { uid, name: &name },
                action: Action::of_admin_method(method),
                resource: Resource::AdminCall(method),
                context: AccessContext {
                    node: "",
                    selectors: &[],
                    ttl_seconds: 0,
                    source: Source::AdminSocket,
                    method,
                    elevation: None,
                },
            };
            // A denial is on the trail already, naming the deciding policies.
            let decision = self
                .policy
                .authorize(&access, &format!("admin.{call}"))
                .map_err(|denied| {
                    Status::permission_denied(format!("{method}: {}", denied.reason))
                })?;
            policy_set = Arc::from(decision.hash.as_str());
        }
        Ok(Operator { uid, policy_set })
    }
}

impl<S> tower::Layer<S> for OperatorLayer {
    type Service = OperatorGate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OperatorGate {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct OperatorGate<S> {
    inner: S,
    layer: OperatorLayer,
}

impl<S, B, R> tower::Service<http::Request<B>> for OperatorGate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Self::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.layer.check(&request) {
            Ok(operator) => {
                request.extensions_mut().insert(operator);
                Either::Left(self.inner.call(request))
            }
            Err(status) => Either::Right(ready(Ok(status.into_http()))),
        }
    }
}

/// `/mayfly.v1.Admin/CreateEntry` -> `create_entry`, as the audit trail names admin calls.
fn method_name(path: &str) -> String {
    let method = path.rsplit('/').next().unwrap_or(path);
    let mut out = String::with_capacity(method.len() + 4);
    for (i, c) in method.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_calls_are_named_as_their_handlers() {
        assert_eq!(method_name("/mayfly.v1.Admin/CreateEntry"), "create_entry");
        assert_eq!(method_name("/mayfly.v1.Admin/ShowCa"), "show_ca");
        assert_eq!(method_name("/mayfly.v1.Admin/Revoke"), "revoke");
        assert_eq!(method_name("odd"), "odd");
    }
}

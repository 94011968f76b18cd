//! The one record of an elevation, as `elevation show` gives it: the request, each review,
//! every credential issued under it, and the revocation that took them back with each
//! agent's acknowledgement. Reading one is itself decided (`view_elevation`), except for
//! its own requester.

use super::*;
use crate::revoke::Report;
use crate::store::{CredentialLease, LeaseFilter};

/// An elevation with everything that happened under it.
pub struct ElevationView {
    pub record: ElevationRecord,
    pub reviews: Vec<ElevationReview>,
    /// Every lease issued under it, revoked ones too.
    pub leases: Vec<CredentialLease>,
    pub revocation: Option<Report>,
    /// What its requester should know (an STS session cannot be ended early).
    pub notices: Vec<String>,
}

impl Elevations {
    /// The whole record of `id`, for its requester or an operator the policies let view it.
    pub async fn view(&self, caller: &Caller, id: &str) -> Result<ElevationView, ElevationError> {
        let record = self.get(id).await?;
        if record.requester != caller.requester() {
            self.authorize_view(caller, &record, Action::ViewElevation, "elevation.view")
                .await?;
        }
        self.assemble(record).await
    }

    /// The reviews of `id` so far.
    pub async fn reviews(&self, id: &str) -> Result<Vec<ElevationReview>, ElevationError> {
        Ok(self.store.elevation_reviews(id).await?)
    }

    /// Elevations `caller` may view, newest first: all states unless `state` narrows them.
    pub async fn list(
        &self,
        caller: &Caller,
        state: Option<ElevationState>,
        requester: Option<&str>,
    ) -> Result<Vec<(ElevationRecord, Vec<ElevationReview>)>, ElevationError> {
        let mut out = Vec::new();
        for record in self.store.list_elevations(state, requester, 1000).await? {
            let visible =
                record.requester == caller.requester() || self.may_view(caller, &record).await?;
            if visible {
                let reviews = self.store.elevation_reviews(&record.id).await?;
                out.push((record, reviews));
            }
        }
        Ok(out)
    }

    /// Whether the policies let `caller` view `record`; a denial is not a security event
    /// here (a listing simply leaves the record out), so it is not audited.
    async fn may_view(
        &self,
        caller: &Caller,
        record: &ElevationRecord,
    ) -> Result<bool, ElevationError> {
        let Caller::Operator { uid, name } = caller else {
            return Ok(false);
        };
        let spec = match self.broker.describe(&record.scope_name).await {
            Ok((spec, _, _)) => spec,
            // Its credential was deleted since: the record stays readable to operators
            // the built-in policies admit (decided on the record alone).
            Err(CredsError::NotFound(_)) => return Ok(true),
            Err(e) => return Err(e.into()),
        };
        let decision = self.policy.decide(&Access {
            principal: Principal::Operator {
                uid: *uid,
                name: name.as_str(),
            },
            action: Action::ViewElevation,
            resource: spec.policy_resource(),
            context: context_of(
                record,
                Source::ElevationSocket,
                "ListElevations",
                facts_of(record, 0, 0),
            ),
        });
        Ok(decision.granted())
    }

    async fn assemble(&self, record: ElevationRecord) -> Result<ElevationView, ElevationError> {
        let reviews = self.store.elevation_reviews(&record.id).await?;
        let leases = self
            .broker
            .leases(&LeaseFilter {
                elevation_id: Some(record.id.clone()),
                all: true,
                ..Default::default()
            })
            .await?;
        let revocation = if record.revocation_id.is_empty() {
            None
        } else {
            Some(self.revoker.report(&record.revocation_id).await?)
        };
        let mut notices = Vec::new();
        if let Ok((spec, _, _)) = self.broker.describe(&record.scope_name).await
            && spec.kind() == "aws_sts"
        {
            notices.push(
                "AWS cannot end an STS session early and issues none shorter than 15 minutes: \
                 its credentials keep working until their own expiry after the elevation ends \
                 (where the role allows it, deny sessions by aws:TokenIssueTime to cut them off)"
                    .to_string(),
            );
        }
        if record.review_required && record.reviewed_at.is_none() {
            notices.push("break-glass: needs a review (`mayflyd elevation review ID`)".into());
        }
        Ok(ElevationView {
            record,
            reviews,
            leases,
            revocation,
            notices,
        })
    }
}

//! The one record of an elevation, as `elevation show` gives it: the request, each review,
//! every credential issued under it and every SVID signed for its temporary entry, and the
//! revocation that took them back with each
//! agent's acknowledgement. Reading one is itself decided (`view_elevation`), except for
//! its own requester.

use super::*;
use crate::revoke::Report;
use crate::store::{CredentialLease, IssuedSvidRecord, LeaseFilter};

/// An elevation with everything that happened under it.
pub struct ElevationView {
    pub record: ElevationRecord,
    pub reviews: Vec<ElevationReview>,
    /// Every lease issued under it, revoked ones too.
    pub leases: Vec<CredentialLease>,
    /// Every SVID signed for its temporary entry (an elevation of an entry).
    pub svids: Vec<IssuedSvidRecord>,
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
        // What it is to may have been deleted since: the record stays readable, decided
        // on its name alone.
        let subject = self
            .subject(&record.scope_kind, &record.scope_name, false)
            .await?;
        let decision = self.policy.decide(&Access {
            principal: Principal::Operator {
                uid: *uid,
                name: name.as_str(),
            },
            action: Action::ViewElevation,
            resource: subject.resource(),
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
        let mut svids = if record.granted_entry.is_empty() {
            Vec::new()
        } else {
            // Every one signed, expired ones too while the store remembers them.
            self.store
                .live_serials_for_entries(std::slice::from_ref(&record.granted_entry), 0)
                .await?
        };
        svids.sort_by(|a, b| a.issued_at.cmp(&b.issued_at).then(a.serial.cmp(&b.serial)));
        let revocation = if record.revocation_id.is_empty() {
            None
        } else {
            Some(self.revoker.report(&record.revocation_id).await?)
        };
        let mut notices = Vec::new();
        if record.scope_kind == CREDENTIAL
            && let Ok((spec, _, _)) = self.broker.describe(&record.scope_name).await
            && spec.kind() == "aws_sts"
        {
            notices.push(
                "AWS cannot end an STS session early and issues none shorter than 15 minutes: \
                 its credentials keep working until their own expiry after the elevation ends \
                 (where the role allows it, deny sessions by aws:TokenIssueTime to cut them off)"
                    .to_string(),
            );
        }
        if record.scope_kind == SECRET {
            notices.push(
                "the secret is rotated when the elevation ends: a copy kept is worth nothing \
                 after that"
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
            svids,
            revocation,
            notices,
        })
    }
}

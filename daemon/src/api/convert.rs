//! Store records, CA snapshots and audit rows to their protobuf shapes.

use mayfly_proto::v1;

use crate::audit::Verification;
use crate::ca::bundle_pem;
use crate::ca::manager::BundleSnapshot;
use crate::store::{AgentRecord, AuditRow, CaSlotRecord, EntryRecord, JobRecord};

pub fn entry(record: &EntryRecord) -> v1::Entry {
    v1::Entry {
        id: record.id.clone(),
        spiffe_id: record.spiffe_id.clone(),
        parent_id: record.parent_id.clone(),
        selectors: record
            .selectors
            .iter()
            .map(|s| match s.split_once(':') {
                Some((kind, value)) => v1::Selector {
                    r#type: kind.to_string(),
                    value: value.to_string(),
                },
                None => v1::Selector {
                    r#type: s.clone(),
                    value: String::new(),
                },
            })
            .collect(),
        x509_svid_ttl: record.x509_svid_ttl,
        jwt_svid_ttl: record.jwt_svid_ttl,
        dns_names: record.dns_names.clone(),
        hint: record.hint.clone(),
        sets: record.sets.clone(),
        expires_at: record.expires_at,
        revision: record.revision,
        created_at: record.created_at,
        updated_at: record.updated_at,
    }
}

pub fn bundle(trust_domain: &str, snapshot: &BundleSnapshot, refresh_hint: i64) -> v1::Bundle {
    v1::Bundle {
        trust_domain: trust_domain.to_string(),
        x509_authorities: snapshot.x509_authorities.clone(),
        jwt_authorities: snapshot
            .jwt_keys
            .iter()
            .map(|(kid, spki)| v1::JwtKey {
                key_id: kid.clone(),
                public_key: spki.clone(),
                expires_at: 0,
            })
            .collect(),
        sequence_number: snapshot.sequence,
        refresh_hint,
    }
}

pub fn agent(record: &AgentRecord) -> v1::Agent {
    v1::Agent {
        spiffe_id: record.spiffe_id.clone(),
        serial: record.serial.clone(),
        status: record.status.as_str().to_string(),
        attested_at: record.attested_at,
        svid_expires_at: record.svid_expires_at,
        last_seen: record.last_seen,
    }
}

pub fn job(job: &JobRecord) -> v1::RotationJob {
    v1::RotationJob {
        token: job.token.clone(),
        state: job.state.to_string(),
        username: job.username.clone(),
        trigger: job.trigger_kind.to_string(),
        attempts: job.attempts,
        last_error: job.last_error.clone(),
        created_at: job.created_at,
        finished_at: job.finished_at.unwrap_or(0),
    }
}

pub fn ca_slot(record: &CaSlotRecord) -> v1::CaSlot {
    let ski = x509_parser::parse_x509_certificate(&record.cert_der)
        .ok()
        .and_then(|(_, cert)| {
            cert.extensions()
                .iter()
                .find_map(|ext| match ext.parsed_extension() {
                    x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => {
                        Some(hex::encode(id.0))
                    }
                    _ => None,
                })
        })
        .unwrap_or_default();
    v1::CaSlot {
        id: record.id.clone(),
        state: record.state.as_str().to_string(),
        subject_key_id: ski,
        not_before: record.not_before,
        not_after: record.not_after,
        jwt_key_id: record.jwt_kid.clone(),
        certificate: bundle_pem(std::slice::from_ref(&record.cert_der)),
    }
}

pub fn audit_record(row: AuditRow) -> v1::AuditRecord {
    v1::AuditRecord {
        seq: row.seq,
        at_ms: row.at_ms,
        actor: row.actor,
        action: row.action,
        subject: row.subject,
        scope: row.scope,
        ttl_secs: row.ttl_secs,
        reason: row.reason,
        outcome: row.outcome,
        detail: row.detail,
        prev_hash: row.prev_hash,
        hash: row.hash,
    }
}

/// What `audit verify` found, as the admin API and the offline `audit verify --file` print it.
pub fn verification(verdict: Verification) -> v1::VerifyAuditResponse {
    let (first_bad_seq, problem) = verdict
        .first_bad
        .map(|fault| (fault.seq(), fault.to_string()))
        .unwrap_or_default();
    v1::VerifyAuditResponse {
        good: verdict.good,
        head_seq: verdict.head.0,
        head_hash: verdict.head.1,
        first_bad_seq,
        problem,
    }
}

pub fn lease(lease: &crate::store::CredentialLease) -> v1::Lease {
    v1::Lease {
        id: lease.id.clone(),
        credential: lease.credential.clone(),
        holder: lease.holder.clone(),
        agent_id: lease.agent_id.clone(),
        backend_id: lease.backend_id.clone(),
        issued_at: lease.issued_at,
        expires_at: lease.expires_at,
        state: lease.state.to_string(),
        revoked_at: lease.revoked_at.unwrap_or(0),
        reason: lease.reason.clone(),
    }
}

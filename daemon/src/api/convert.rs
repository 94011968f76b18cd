//! Store records and CA snapshots to their protobuf shapes.

use mayfly_proto::v1;

use crate::ca::manager::BundleSnapshot;
use crate::store::{AgentRecord, EntryRecord};

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

//! The contract between `mayflyd`, `mayfly-agent` and SPIFFE workloads, and nothing else:
//! the generated gRPC services, the Workload API's codec, and Debug impls that keep secret
//! fields out of every print. What the programs share beyond the wire is `mayfly-common`.

#![forbid(unsafe_code)]

pub mod workload_codec;

/// The SPIFFE Workload API. Its proto has no package, so the service is `SpiffeWorkloadAPI`.
pub mod workload {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("_");
}

/// Mayfly's own APIs: node (daemon <-> agent), admin (operator CLI <-> daemon) and
/// workload secrets (agent <-> local workload).
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("mayfly.v1");
}

/// Metadata every Workload API request must carry.
pub const WORKLOAD_HEADER: &str = "workload.spiffe.io";

/// Secret-bearing messages never show their values, whatever prints them.
mod redacted_debug {
    use std::fmt;

    impl fmt::Debug for crate::v1::GrantedSecret {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("GrantedSecret")
                .field("name", &self.name)
                .field("version", &self.version)
                .field("username", &self.username)
                .field(
                    "value",
                    &format_args!("<{} bytes redacted>", self.value.len()),
                )
                .field("granted_to", &self.granted_to)
                .finish()
        }
    }

    impl fmt::Debug for crate::v1::IssuedCredential {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let keys: Vec<&String> = self.values.keys().collect();
            f.debug_struct("IssuedCredential")
                .field("lease_id", &self.lease_id)
                .field("name", &self.name)
                .field("kind", &self.kind)
                .field("values", &format_args!("<{keys:?} redacted>"))
                .field("issued_at", &self.issued_at)
                .field("expires_at", &self.expires_at)
                .field("notice", &self.notice)
                .finish()
        }
    }

    impl fmt::Debug for crate::v1::WorkloadCredential {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let keys: Vec<&String> = self.values.keys().collect();
            f.debug_struct("WorkloadCredential")
                .field("name", &self.name)
                .field("kind", &self.kind)
                .field("values", &format_args!("<{keys:?} redacted>"))
                .field("lease_id", &self.lease_id)
                .field("expires_at", &self.expires_at)
                .field("spiffe_id", &self.spiffe_id)
                .finish()
        }
    }

    impl fmt::Debug for crate::v1::SecretValueResponse {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("SecretValueResponse")
                .field("name", &self.name)
                .field("version", &self.version)
                .field("username", &self.username)
                .field("value", &"<redacted>")
                .finish()
        }
    }

    impl fmt::Debug for crate::v1::WorkloadSecret {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("WorkloadSecret")
                .field("name", &self.name)
                .field("version", &self.version)
                .field("username", &self.username)
                .field(
                    "value",
                    &format_args!("<{} bytes redacted>", self.value.len()),
                )
                .finish()
        }
    }

    impl fmt::Debug for crate::workload::X509svid {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("X509SVID")
                .field("spiffe_id", &self.spiffe_id)
                .field(
                    "x509_svid",
                    &format_args!("<{} bytes>", self.x509_svid.len()),
                )
                .field("x509_svid_key", &"<redacted>")
                .field("hint", &self.hint)
                .finish_non_exhaustive()
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn secret_values_and_keys_never_print() {
            let version = crate::v1::GrantedSecret {
                name: "db".into(),
                value: b"hunter2-secret".to_vec(),
                ..Default::default()
            };
            assert!(!format!("{version:?}").contains("hunter2"));
            let response = crate::v1::SecretValueResponse {
                value: "hunter2-secret".into(),
                ..Default::default()
            };
            assert!(!format!("{response:?}").contains("hunter2"));
            let issued = crate::v1::IssuedCredential {
                lease_id: "ls-1".into(),
                values: [("password".to_string(), "hunter2-secret".to_string())].into(),
                ..Default::default()
            };
            let printed = format!("{issued:?}");
            assert!(
                !printed.contains("hunter2") && printed.contains("password"),
                "{printed}"
            );
            let workload = crate::v1::WorkloadCredential {
                values: [("password".to_string(), "hunter2-secret".to_string())].into(),
                ..Default::default()
            };
            assert!(!format!("{workload:?}").contains("hunter2"));
            let workload = crate::v1::WorkloadSecret {
                name: "db".into(),
                value: b"hunter2-secret".to_vec(),
                ..Default::default()
            };
            assert!(!format!("{workload:?}").contains("hunter2"));
            let svid = crate::workload::X509svid {
                x509_svid_key: b"PRIVATE-KEY-BYTES".to_vec(),
                ..Default::default()
            };
            let shown = format!("{svid:?}");
            assert!(!shown.contains("80, 82, 73"), "{shown}");
        }
    }
}

//! The SPIFFE Workload API.

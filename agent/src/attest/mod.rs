//! Attestation: the node to the daemon (`node`), and workloads to the agent (`workload`).

pub mod node;
pub mod workload;

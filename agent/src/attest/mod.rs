//! Attestation: the node to the daemon, and workloads to the agent.

pub mod workload;

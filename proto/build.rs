//! Compiles the protobuf contract with protox (pure Rust), so no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let workload = ["spiffe/workload.proto"];
    let mayfly = [
        "mayfly/v1/common.proto",
        "mayfly/v1/node.proto",
        "mayfly/v1/admin.proto",
        "mayfly/v1/workload_secrets.proto",
        "mayfly/v1/workload_credentials.proto",
        "mayfly/v1/elevation.proto",
    ];
    for file in workload.iter().chain(&mayfly) {
        println!("cargo:rerun-if-changed={file}");
    }
    // The Workload API gets a codec of its own (see src/workload_codec.rs): its streams live
    // as long as the workloads holding them, so their buffers are sized to the messages.
    tonic_prost_build::configure()
        .skip_debug([".X509SVID"])
        .codec_path("crate::workload_codec::WorkloadCodec")
        .build_server(true)
        .build_client(true)
        .compile_fds(protox::compile(workload, ["."])?)?;
    tonic_prost_build::configure()
        // Messages that carry secret values get a hand-written Debug that hides them.
        .skip_debug([
            "mayfly.v1.GrantedSecret",
            "mayfly.v1.SecretValueResponse",
            "mayfly.v1.WorkloadSecret",
            "mayfly.v1.IssuedCredential",
            "mayfly.v1.WorkloadCredential",
        ])
        .build_server(true)
        .build_client(true)
        .compile_fds(protox::compile(mayfly, ["."])?)?;
    Ok(())
}

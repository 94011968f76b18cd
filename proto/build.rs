//! Compiles the protobuf contract with protox (pure Rust), so no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "spiffe/workload.proto",
        "mayfly/v1/common.proto",
        "mayfly/v1/node.proto",
        "mayfly/v1/admin.proto",
        "mayfly/v1/workload_secrets.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        // Messages that carry secret values get a hand-written Debug that hides them.
        .skip_debug([
            "mayfly.v1.GrantedSecret",
            "mayfly.v1.SecretValueResponse",
            "mayfly.v1.WorkloadSecret",
            ".X509SVID",
        ])
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}

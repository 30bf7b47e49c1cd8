//! Generates the `mesh.v1` gRPC code with a vendored `protoc`, so a fresh
//! machine needs nothing installed by hand (`$PROTOC` wins when set).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = match std::env::var_os("PROTOC") {
        Some(path) => path.into(),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    let protos = [
        "proto/mesh/v1/registry.proto",
        "proto/mesh/v1/discovery.proto",
        "proto/mesh/v1/control.proto",
        "proto/mesh/v1/deployer.proto",
        "proto/mesh/v1/monitor.proto",
        "proto/mesh/v1/identity.proto",
    ];
    tonic_prost_build::configure().compile_with_config(config, &protos, &["proto"])?;
    Ok(())
}

//! Compiles proto/inference.proto (the Open Inference Protocol v2 gRPC service) with
//! protox, a protobuf compiler in Rust: a fresh clone builds with `cargo build` alone,
//! no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/inference.proto");
    let descriptors = protox::compile(["inference.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        // The client is for the integration tests and the gRPC load benchmark.
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}

//! Compiles `proto/twotower/v1/recommender.proto` and writes the encoded descriptor set that
//! gRPC server reflection serves, so `grpcurl` works without the proto file.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let proto_root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let proto = proto_root.join("twotower/v1/recommender.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("twotower_descriptor.bin"))
        .compile_protos(&[proto], &[proto_root])?;
    Ok(())
}

//! Compiles `proto/*.proto` with the pure-Rust `protox` compiler, so no system `protoc` is
//! needed, and hands the descriptors to `prost-build`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/events.proto", "proto/signals.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}

//! Compiles `proto/workload.proto` (the SPIFFE Workload API) into the
//! spoke's gRPC server code with protox, a protobuf compiler in Rust, so a
//! build needs no system `protoc`.

fn main() {
    let proto = "proto/workload.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = match protox::compile([proto], ["proto"]) {
        Ok(fds) => fds,
        Err(e) => {
            eprintln!("{proto}: {e:?}");
            std::process::exit(1);
        }
    };
    if let Err(e) = tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .build_transport(false)
        .compile_fds(fds)
    {
        eprintln!("generating the Workload API code from {proto}: {e}");
        std::process::exit(1);
    }
}

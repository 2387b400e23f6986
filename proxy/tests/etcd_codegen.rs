//! The committed etcd client code (`src/coord/etcdserverpb.rs`) is exactly what
//! `proto/etcd.proto` generates: the file is compiled again here with protox (a
//! protobuf compiler written in Rust, so no `protoc` is needed) and tonic's code
//! generator, and compared byte for byte.
//!
//! After changing the `.proto` file: `UPDATE_GENERATED=1 cargo test -p handoff --test
//! etcd_codegen` writes the new code (and says so), then commit both.

use std::path::Path;

/// The first lines of the committed file, above what the generator writes.
const HEADER: &str = "\
// @generated from proxy/proto/etcd.proto by tonic-prost-build (client only); do not edit.
// Regenerate: UPDATE_GENERATED=1 cargo test -p handoff --test etcd_codegen
";

fn generate() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fds = protox::compile(["etcd.proto"], [root.join("proto")])
        .unwrap_or_else(|e| panic!("proto/etcd.proto does not compile: {e}"));
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("etcd-codegen");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).expect("a directory for the generated code");
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .emit_rerun_if_changed(false)
        .out_dir(&out)
        .compile_fds(fds)
        .expect("code generation");
    let code = std::fs::read_to_string(out.join("etcdserverpb.rs"))
        .expect("the generator writes etcdserverpb.rs");
    format!("{HEADER}{code}")
}

#[test]
fn committed_etcd_client_code_matches_its_proto() {
    let generated = generate();
    let committed_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/coord/etcdserverpb.rs");
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    if committed == generated {
        return;
    }
    if std::env::var_os("UPDATE_GENERATED").is_some() {
        std::fs::write(&committed_path, &generated).expect("writing the generated code");
        eprintln!("wrote {}", committed_path.display());
        return;
    }
    let first_difference = committed
        .lines()
        .zip(generated.lines())
        .position(|(a, b)| a != b)
        .map(|i| i + 1)
        .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()) + 1);
    panic!(
        "{} is not what proto/etcd.proto generates (first difference at line {first_difference}); \
         run `UPDATE_GENERATED=1 cargo test -p handoff --test etcd_codegen` and commit the result",
        committed_path.display()
    );
}

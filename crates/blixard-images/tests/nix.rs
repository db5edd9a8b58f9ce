#![allow(clippy::unwrap_used)]
//! Closure round trip with the real `nix-store`: a tiny closure built offline (a runner
//! derivation with `/bin/sh` as builder referring to a directory and a text file), pushed on
//! A, fetched on B, imported into a separate Nix store (verified), and unpacked without Nix
//! on C.

mod common;

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use blixard_images::{Materialised, NixOptions};
use common::*;

fn nix_env() -> Vec<(OsString, OsString)> {
    vec![("NIX_CONFIG".into(), "build-users-group =\nsubstituters =\nsandbox = false\n".into())]
}

fn nix_available(test: &str) -> bool {
    if NixOptions::default().nix_store().is_some() {
        return true;
    }
    if require_real() {
        panic!("{test}: nix-store not found and BLIXARD_REQUIRE_REAL=1 (apt-get install nix-bin)");
    }
    eprintln!("SKIPPED {test}: nix-store not found (apt-get install nix-bin to run it)");
    false
}

/// Builds `result` -> runner with references to a directory (exec file, symlink) and a file.
fn build_closure(dir: &Path) -> PathBuf {
    let nonce = format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    let d = dir.join("kernel-dir");
    std::fs::create_dir_all(d.join("bin")).unwrap();
    std::fs::write(d.join("bin/tool"), format!("#!/bin/sh\necho {nonce}\n")).unwrap();
    std::fs::set_permissions(d.join("bin/tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("bin/tool", d.join("link")).unwrap();
    std::fs::write(d.join("data"), common::pseudo_random(300_000, 7)).unwrap();
    let expr = format!(
        r#"let
  dir = builtins.path {{ path = {d}; name = "kernel-dir-{nonce}"; }};
  txt = builtins.toFile "initrd-{nonce}.txt" "initrd {nonce}";
in derivation {{
  name = "microvm-run-{nonce}"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "/bin/mkdir -p $out/bin; printf '#!/bin/sh\\nexec ${{dir}}/bin/tool ${{txt}}\\n' > $out/bin/microvm-run; /bin/chmod +x $out/bin/microvm-run; /bin/ln -s bin/microvm-run $out/run" ];
}}"#,
        d = d.display()
    );
    let f = dir.join("runner.nix");
    std::fs::write(&f, expr).unwrap();
    let result = dir.join("result");
    let out = Command::new("nix-build")
        .envs(nix_env())
        .arg(&f)
        .arg("-o")
        .arg(&result)
        .output()
        .unwrap();
    assert!(out.status.success(), "nix-build: {}", String::from_utf8_lossy(&out.stderr));
    result
}

fn nix_store(args: &[&str]) -> String {
    let out = Command::new("nix-store").envs(nix_env()).args(args).output().unwrap();
    assert!(out.status.success(), "nix-store {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Compares two trees: file bytes, exec bits, symlink targets.
fn same_tree(a: &Path, b: &Path) {
    let ma = std::fs::symlink_metadata(a).unwrap();
    let mb = std::fs::symlink_metadata(b).unwrap();
    if ma.file_type().is_symlink() {
        assert!(mb.file_type().is_symlink(), "{}", b.display());
        assert_eq!(std::fs::read_link(a).unwrap(), std::fs::read_link(b).unwrap());
    } else if ma.is_dir() {
        assert!(mb.is_dir());
        let mut na: Vec<_> = std::fs::read_dir(a).unwrap().map(|e| e.unwrap().file_name()).collect();
        let mut nb: Vec<_> = std::fs::read_dir(b).unwrap().map(|e| e.unwrap().file_name()).collect();
        na.sort();
        nb.sort();
        assert_eq!(na, nb, "{}", b.display());
        for n in na {
            same_tree(&a.join(&n), &b.join(&n));
        }
    } else {
        assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap(), "{}", b.display());
        assert_eq!(ma.permissions().mode() & 0o100, mb.permissions().mode() & 0o100, "exec bit of {}", b.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closure_round_trip_with_real_nix_store() {
    if !nix_available("closure_round_trip_with_real_nix_store") {
        return;
    }
    let nix = |target: Option<String>, disable: bool| NixOptions { env: nix_env(), target_store: target, disable_import: disable, ..Default::default() };
    let a = node_with(|o| o.nix = nix(None, false)).await;
    let result = build_closure(a.dir.path());
    let entry = std::fs::read_link(&result).unwrap().to_string_lossy().to_string();
    let closure: Vec<String> = nix_store(&["-qR", &entry]).lines().map(String::from).collect();
    assert_eq!(closure.len(), 3);

    let img = a.images.add_closure(&result, &noop).await.unwrap();
    let m = a.images.manifest(img.hash).await.unwrap();
    let blixard_images::manifest::Image::NixClosure(c) = m.image() else { panic!() };
    assert_eq!(c.entry, entry);
    assert_eq!(c.paths.len(), 3);
    assert_eq!(c.paths.last().unwrap().store_path, entry, "references come first");
    for p in &c.paths {
        let h = nix_store(&["-q", "--hash", &p.store_path]);
        assert_eq!(h.trim(), format!("sha256:{}", blixard_images::nix::nix32_encode(&p.nar_hash)));
    }

    // B imports into its own Nix store (a separate store root, as on another machine).
    let b_tmp = tempfile::tempdir().unwrap();
    let b_store = format!("local?root={}", b_tmp.path().join("nixroot").display());
    let b = node_with(|o| o.nix = nix(Some(b_store.clone()), false)).await;
    b.images.fetch(img.hash, vec![a.addr()], &noop).await.unwrap();
    let mb = b.images.materialise(img.hash, &noop).await.unwrap();
    let Materialised::NixStore { entry: e, gc_root } = &mb else { panic!("{mb:?}") };
    assert_eq!(e, &entry);
    assert!(gc_root.symlink_metadata().is_ok());
    for p in &closure {
        let orig = nix_store(&["-q", "--hash", p]);
        let imported = nix_store(&["--store", &b_store, "-q", "--hash", p]);
        assert_eq!(orig, imported, "{p}");
        let refs_a = nix_store(&["-q", "--references", p]);
        let refs_b = nix_store(&["--store", &b_store, "-q", "--references", p]);
        assert_eq!(refs_a, refs_b);
        same_tree(Path::new(p), &b_tmp.path().join("nixroot").join(p.trim_start_matches('/')));
    }
    // Idempotent.
    assert_eq!(b.images.materialise(img.hash, &noop).await.unwrap(), mb);

    // C has no Nix (import disabled): a store-path layout under its data dir.
    let c_node = node_with(|o| o.nix = nix(None, true)).await;
    c_node.images.fetch(img.hash, vec![a.addr(), b.addr()], &noop).await.unwrap();
    let mc = c_node.images.materialise(img.hash, &noop).await.unwrap();
    let Materialised::StoreLayout { root, entry: e } = &mc else { panic!("{mc:?}") };
    assert!(e.join("bin/microvm-run").is_file());
    for p in &closure {
        same_tree(Path::new(p), &root.join(p.trim_start_matches('/')));
    }
    // gc removes the materialised copy too.
    c_node.images.gc(&[]).await.unwrap();
    assert!(!root.exists());
    for n in [a, b, c_node] {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closure_errors_name_the_problem() {
    if !nix_available("closure_errors_name_the_problem") {
        return;
    }
    let a = node_with(|o| o.nix = NixOptions { env: nix_env(), ..Default::default() }).await;
    // A store path that does not exist (not valid): clear error naming it.
    let bogus = Path::new("/nix/store/00000000000000000000000000000000-missing");
    let e = a.images.add_closure(bogus, &noop).await.unwrap_err();
    eprintln!("missing path: {e}");
    assert!(e.to_string().contains("00000000000000000000000000000000-missing"), "{e}");
    // nix-store not found.
    let none = node_with(|o| o.nix = NixOptions { bin_dir: Some("/nonexistent".into()), ..Default::default() }).await;
    let e = none.images.add_closure(bogus, &noop).await.unwrap_err();
    assert!(e.to_string().contains("apt-get install nix-bin"), "{e}");
    a.stop().await;
    none.stop().await;
}

/// A manifest whose NAR hash for one store path was tampered with (the blobs all verify:
/// the manifest is a valid blob of its own) is refused when materialised, with or without
/// Nix, naming the path and both hashes; nothing reaches the Nix store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_nar_hash_is_refused_on_import() {
    if !nix_available("a_tampered_nar_hash_is_refused_on_import") {
        return;
    }
    use blixard_images::manifest::{Image, Manifest};
    use iroh_blobs::hashseq::HashSeq;
    let nix = |target: Option<String>, disable: bool| NixOptions { env: nix_env(), target_store: target, disable_import: disable, ..Default::default() };
    let a = node_with(|o| o.nix = nix(None, false)).await;
    let result = build_closure(a.dir.path());
    let img = a.images.add_closure(&result, &noop).await.unwrap();

    // The same image with one NAR hash changed: a new manifest, a new root.
    let root: Vec<_> = HashSeq::new(a.images.blobs().get_bytes(img.hash).await.unwrap()).unwrap().iter().collect();
    let Manifest::V1(mut m) = Manifest::decode(&a.images.blobs().get_bytes(root[0]).await.unwrap()).unwrap();
    let Image::NixClosure(c) = &mut m.image else { panic!("a closure") };
    let victim = c.paths[0].store_path.clone();
    c.paths[0].nar_hash[0] ^= 1;
    let tampered_manifest = a.images.blobs().add_bytes(Manifest::V1(m).encode()).temp_tag().await.unwrap();
    let new_root: HashSeq = std::iter::once(tampered_manifest.hash()).chain(root[1..].iter().copied()).collect();
    let tampered = a
        .images
        .blobs()
        .add_bytes_with_opts(iroh_blobs::api::blobs::AddBytesOptions { data: new_root.into(), format: iroh_blobs::BlobFormat::HashSeq })
        .temp_tag()
        .await
        .unwrap();

    let b_tmp = tempfile::tempdir().unwrap();
    let b_store = format!("local?root={}", b_tmp.path().join("nixroot").display());
    let with_nix = node_with(|o| o.nix = nix(Some(b_store.clone()), false)).await;
    let without = node_with(|o| o.nix = nix(None, true)).await;
    for n in [&with_nix, &without] {
        // Every byte verifies against its BLAKE3 hash: the fetch succeeds.
        n.images.fetch(tampered.hash(), vec![a.addr()], &noop).await.unwrap();
        let e = n.images.materialise(tampered.hash(), &noop).await.unwrap_err();
        eprintln!("tampered NAR hash: {e}");
        assert!(matches!(e, blixard_images::MaterialiseError::NarHashMismatch { .. }), "{e}");
        assert!(e.to_string().contains(&victim), "names the path: {e}");
    }
    let imported = Command::new("nix-store").envs(nix_env()).args(["--store", &b_store, "--check-validity", &victim]).output().unwrap();
    assert!(!imported.status.success(), "{victim} must not be in B's Nix store");
    for n in [a, with_nix, without] {
        n.stop().await;
    }
}
